output "instance_id" {
  description = "EC2 instance id."
  value       = aws_instance.this.id
}

output "public_ip" {
  description = "Public IPv4 address."
  value       = aws_instance.this.public_ip
}

output "private_ip" {
  description = "Private IPv4 address in the VPC."
  value       = aws_instance.this.private_ip
}
