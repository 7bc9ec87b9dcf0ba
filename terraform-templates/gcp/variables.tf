# Inputs shared by every Tether target, then this target's own.

variable "server_name" {
  description = "Name of the server (also used to name its firewall and keys)."
  type        = string
}

variable "region" {
  description = "GCP region (the zone is <region>-b unless zone is set)."
  type        = string
  default     = "europe-west1"
}

variable "instance_type" {
  description = "Compute Engine machine type."
  type        = string
  default     = "e2-small"
}

variable "image" {
  description = "Boot image (must run cloud-init: Ubuntu images do, Debian images do not)."
  type        = string
  default     = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
}

variable "disk_size_gb" {
  description = "Size of the boot disk, in GB."
  type        = number
  default     = 20
}

variable "ssh_public_keys" {
  description = "OpenSSH public keys allowed to log in. Non-empty also opens inbound SSH (22)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Become instance labels (lowercased; characters GCP refuses become _)."
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

# GCP only.

variable "project" {
  description = "GCP project id. Empty: the GOOGLE_PROJECT environment variable (or the credentials' project)."
  type        = string
  default     = ""
}

variable "zone" {
  description = "Zone. Empty: <region>-b."
  type        = string
  default     = ""
}

variable "network" {
  description = "VPC network of the instance and its firewall rules."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork. Empty: the network's subnetwork in the region (auto-mode networks)."
  type        = string
  default     = ""
}

variable "ssh_user" {
  description = "User the ssh_public_keys log in as."
  type        = string
  default     = "tether"
}
