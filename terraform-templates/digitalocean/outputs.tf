output "instance_id" {
  description = "Droplet id."
  value       = digitalocean_droplet.this.id
}

output "public_ip" {
  description = "Public IPv4 address."
  value       = digitalocean_droplet.this.ipv4_address
}

output "private_ip" {
  description = "Private IPv4 address in the droplet's VPC."
  value       = digitalocean_droplet.this.ipv4_address_private
}
