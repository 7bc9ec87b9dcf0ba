output "instance_id" {
  description = "Hetzner Cloud server id."
  value       = hcloud_server.this.id
}

output "public_ip" {
  description = "Public IPv4 address."
  value       = hcloud_server.this.ipv4_address
}

output "private_ip" {
  description = "Private IPv4 address (empty: the server is in no private network)."
  value       = try(tolist(hcloud_server.this.network)[0].ip, "")
}
