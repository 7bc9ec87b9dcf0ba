output "instance_id" {
  description = "Id of the terraform_data resource standing for the server."
  value       = terraform_data.server.id
}

output "public_ip" {
  description = "The container's address (reachable from this machine)."
  value       = local.ip
}

output "private_ip" {
  description = "The container's address on docker_network."
  value       = local.ip
}

output "container_name" {
  description = "The container."
  value       = local.container
}

output "host_address" {
  description = "This machine as the container sees it: where the control plane must listen for it (API URL and QUIC address in the user-data)."
  value       = local.gateway
}
