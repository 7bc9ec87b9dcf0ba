# Inputs shared by every Tether target, then this target's own.

variable "server_name" {
  description = "Name of the server (also used to name its firewall and keys)."
  type        = string
}

variable "region" {
  description = "Azure location."
  type        = string
  default     = "westeurope"
}

variable "instance_type" {
  description = "Azure VM size."
  type        = string
  default     = "Standard_B1s"
}

variable "image" {
  description = "Marketplace image as publisher:offer:sku:version."
  type        = string
  default     = "Canonical:ubuntu-24_04-lts:server:latest"
}

variable "disk_size_gb" {
  description = "Size of the OS disk, in GB (Ubuntu images need at least 30)."
  type        = number
  default     = 30
}

variable "ssh_public_keys" {
  description = "OpenSSH public keys allowed to log in. Non-empty also opens inbound SSH (22)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags of every resource."
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

# Azure only.

variable "admin_username" {
  description = "The VM's admin user (logs in with ssh_public_keys)."
  type        = string
  default     = "tether"
}

variable "vnet_cidr" {
  description = "Address space of the VNet made for the server (its subnet is the first /24)."
  type        = string
  default     = "10.42.0.0/16"
}
