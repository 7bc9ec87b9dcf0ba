output "instance_id" {
  description = "Azure resource id of the VM."
  value       = azurerm_linux_virtual_machine.this.id
}

output "public_ip" {
  description = "Public IPv4 address."
  value       = azurerm_linux_virtual_machine.this.public_ip_address
}

output "private_ip" {
  description = "Private IPv4 address in the VNet."
  value       = azurerm_linux_virtual_machine.this.private_ip_address
}
