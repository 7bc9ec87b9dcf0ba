# Tether server on Azure: a resource group holding a Linux VM booted with the
# control plane's cloud-init user-data (custom_data), its VNet, subnet,
# public IP and NIC, and a network security group letting the agent reach its
# control plane (and SSH in only when keys are given or allow_ssh).
# Credentials: ARM_CLIENT_ID / ARM_CLIENT_SECRET / ARM_TENANT_ID /
# ARM_SUBSCRIPTION_ID from the environment, never a variable.

provider "azurerm" {
  features {}
}

locals {
  ssh_open = length(var.ssh_public_keys) > 0 || var.allow_ssh
  image    = split(":", var.image)
  # Azure wants an admin key even when nobody should log in.
  admin_keys = length(var.ssh_public_keys) > 0 ? var.ssh_public_keys : [tls_private_key.unused[0].public_key_openssh]

  inbound = local.ssh_open ? [
    { name = "ssh", priority = 100, direction = "Inbound", access = "Allow", protocol = "Tcp", port = "22", from = var.ssh_source_cidrs, to = ["*"] },
  ] : []
  outbound = var.restrict_egress ? [
    { name = "tether-quic", priority = 100, direction = "Outbound", access = "Allow", protocol = "Udp", port = tostring(var.control_plane_quic_port), from = ["*"], to = [var.control_plane_cidr] },
    { name = "tether-api", priority = 110, direction = "Outbound", access = "Allow", protocol = "Tcp", port = tostring(var.control_plane_api_port), from = ["*"], to = [var.control_plane_cidr] },
    { name = "dns", priority = 120, direction = "Outbound", access = "Allow", protocol = "*", port = "53", from = ["*"], to = ["*"] },
    { name = "ntp", priority = 130, direction = "Outbound", access = "Allow", protocol = "Udp", port = "123", from = ["*"], to = ["*"] },
    { name = "azure-platform", priority = 140, direction = "Outbound", access = "Allow", protocol = "*", port = "*", from = ["*"], to = ["168.63.129.16/32", "169.254.169.254/32"] },
    { name = "deny-internet", priority = 4000, direction = "Outbound", access = "Deny", protocol = "*", port = "*", from = ["*"], to = ["Internet"] },
  ] : []
}

resource "tls_private_key" "unused" {
  count     = length(var.ssh_public_keys) > 0 ? 0 : 1
  algorithm = "RSA"
  rsa_bits  = 4096
}

resource "azurerm_resource_group" "this" {
  name     = "${var.server_name}-rg"
  location = var.region
  tags     = var.tags
}

resource "azurerm_virtual_network" "this" {
  name                = "${var.server_name}-vnet"
  location            = azurerm_resource_group.this.location
  resource_group_name = azurerm_resource_group.this.name
  address_space       = [var.vnet_cidr]
  tags                = var.tags
}

resource "azurerm_subnet" "this" {
  name                 = "${var.server_name}-subnet"
  resource_group_name  = azurerm_resource_group.this.name
  virtual_network_name = azurerm_virtual_network.this.name
  address_prefixes     = [cidrsubnet(var.vnet_cidr, 8, 1)]
}

resource "azurerm_public_ip" "this" {
  name                = "${var.server_name}-ip"
  location            = azurerm_resource_group.this.location
  resource_group_name = azurerm_resource_group.this.name
  allocation_method   = "Static"
  sku                 = "Standard"
  tags                = var.tags
}

resource "azurerm_network_security_group" "this" {
  name                = "${var.server_name}-nsg"
  location            = azurerm_resource_group.this.location
  resource_group_name = azurerm_resource_group.this.name
  tags                = var.tags

  dynamic "security_rule" {
    for_each = concat(local.inbound, local.outbound)
    content {
      name                         = security_rule.value.name
      priority                     = security_rule.value.priority
      direction                    = security_rule.value.direction
      access                       = security_rule.value.access
      protocol                     = security_rule.value.protocol
      source_port_range            = "*"
      destination_port_range       = security_rule.value.port
      source_address_prefix        = length(security_rule.value.from) == 1 ? security_rule.value.from[0] : null
      source_address_prefixes      = length(security_rule.value.from) == 1 ? null : security_rule.value.from
      destination_address_prefix   = length(security_rule.value.to) == 1 ? security_rule.value.to[0] : null
      destination_address_prefixes = length(security_rule.value.to) == 1 ? null : security_rule.value.to
    }
  }
}

resource "azurerm_network_interface" "this" {
  name                = "${var.server_name}-nic"
  location            = azurerm_resource_group.this.location
  resource_group_name = azurerm_resource_group.this.name
  tags                = var.tags

  ip_configuration {
    name                          = "primary"
    subnet_id                     = azurerm_subnet.this.id
    private_ip_address_allocation = "Dynamic"
    public_ip_address_id          = azurerm_public_ip.this.id
  }
}

resource "azurerm_network_interface_security_group_association" "this" {
  network_interface_id      = azurerm_network_interface.this.id
  network_security_group_id = azurerm_network_security_group.this.id
}

resource "azurerm_linux_virtual_machine" "this" {
  name                            = var.server_name
  computer_name                   = substr(var.server_name, 0, 64)
  resource_group_name             = azurerm_resource_group.this.name
  location                        = azurerm_resource_group.this.location
  size                            = var.instance_type
  admin_username                  = var.admin_username
  disable_password_authentication = true
  network_interface_ids           = [azurerm_network_interface.this.id]
  custom_data                     = base64encode(var.user_data)
  tags                            = var.tags

  dynamic "admin_ssh_key" {
    for_each = local.admin_keys
    content {
      username   = var.admin_username
      public_key = admin_ssh_key.value
    }
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "StandardSSD_LRS"
    disk_size_gb         = var.disk_size_gb
  }

  source_image_reference {
    publisher = local.image[0]
    offer     = local.image[1]
    sku       = local.image[2]
    version   = local.image[3]
  }

  # The NSG is on the NIC before the VM boots and runs its bootstrap.
  depends_on = [azurerm_network_interface_security_group_association.this]

  lifecycle {
    precondition {
      condition     = length(local.image) == 4
      error_message = "The image must be publisher:offer:sku:version."
    }
  }
}
