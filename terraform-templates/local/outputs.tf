output "instance_id" {
  description = "Id of the terraform_data resource standing for the server."
  value       = terraform_data.server.id
}

output "public_ip" {
  description = "The local server is this machine."
  value       = "127.0.0.1"
}

output "private_ip" {
  description = "The local server is this machine."
  value       = "127.0.0.1"
}

output "root" {
  description = "Directory playing the server's filesystem root."
  value       = local.root
}

output "pid_file" {
  description = "Pid file of the agent process (under the root)."
  value       = "${local.root}/run/tether-agent.pid"
}
