# Inputs shared by every Tether target, then this target's own.

variable "server_name" {
  description = "Name of the server (also used to name its firewall and keys)."
  type        = string
}

variable "region" {
  description = "Hetzner Cloud location (fsn1, nbg1, hel1, ash, hil, sin)."
  type        = string
  default     = "fsn1"
}

variable "instance_type" {
  description = "Hetzner Cloud server type."
  type        = string
  default     = "cx22"
}

variable "image" {
  description = "Hetzner Cloud image name (must run cloud-init)."
  type        = string
  default     = "ubuntu-24.04"
}

variable "disk_size_gb" {
  description = "Ignored: the server type decides its disk."
  type        = number
  default     = 40
}

variable "ssh_public_keys" {
  description = "OpenSSH public keys allowed to log in. Non-empty also opens inbound SSH (22)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Become server labels (characters Hetzner refuses become _)."
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
