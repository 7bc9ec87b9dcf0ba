output "instance_id" {
  description = "Compute Engine instance id."
  value       = google_compute_instance.this.instance_id
}

output "public_ip" {
  description = "Public IPv4 address."
  value       = google_compute_instance.this.network_interface[0].access_config[0].nat_ip
}

output "private_ip" {
  description = "Internal IPv4 address."
  value       = google_compute_instance.this.network_interface[0].network_ip
}
