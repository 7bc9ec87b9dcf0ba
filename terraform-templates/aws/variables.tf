# Inputs shared by every Tether target, then this target's own.

variable "server_name" {
  description = "Name of the server (also used to name its firewall and keys)."
  type        = string
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-central-1"
}

variable "instance_type" {
  description = "EC2 instance type (Graviton types get an arm64 image)."
  type        = string
  default     = "t3.small"
}

variable "image" {
  description = "AMI id. Empty: the latest Ubuntu 24.04 LTS AMI from Canonical for the instance type's architecture."
  type        = string
  default     = ""
}

variable "disk_size_gb" {
  description = "Size of the root volume (gp3, encrypted), in GB."
  type        = number
  default     = 20
}

variable "ssh_public_keys" {
  description = "OpenSSH public keys allowed to log in. Non-empty also opens inbound SSH (22)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags of every resource (plus Name = server_name)."
  type        = map(string)
  default     = {}
}

variable "user_data" {
  description = "The #cloud-config document rendered by the control plane (holds the one-time bootstrap token)."
  type        = string
  sensitive   = true

  validation {
    condition     = startswith(var.user_data, "#cloud-config")
    error_message = "The user_data must be a #cloud-config document."
  }
}

# Firewall: the agent only dials out (QUIC to the control plane, HTTP(S) to
# its API for the agent download and boot stages, DNS, NTP).

variable "control_plane_cidr" {
  description = "Where the control plane is (CIDR); outbound QUIC and API traffic may go only there."
  type        = string
  default     = "0.0.0.0/0"
}

variable "control_plane_quic_port" {
  description = "UDP port of the control plane's QUIC listener."
  type        = number
  default     = 7443
}

variable "control_plane_api_port" {
  description = "TCP port of the control plane's HTTP API (agent download, boot stages)."
  type        = number
  default     = 8080
}

variable "restrict_egress" {
  description = "Allow outbound traffic only to the control plane, DNS and NTP (false: all outbound traffic)."
  type        = bool
  default     = true
}

variable "allow_ssh" {
  description = "Open inbound SSH (22) even without ssh_public_keys."
  type        = bool
  default     = false
}

variable "ssh_source_cidrs" {
  description = "Where inbound SSH may come from, when it is open."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

# AWS only.

variable "subnet_id" {
  description = "Subnet to launch in. Empty: a default subnet of the region's default VPC."
  type        = string
  default     = ""
}

variable "associate_public_ip" {
  description = "Give the instance a public IPv4 address."
  type        = bool
  default     = true
}
