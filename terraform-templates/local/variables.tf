# Inputs shared by every Tether target. The local target ignores region,
# instance_type, image, disk_size_gb, ssh_public_keys and tags: the "server"
# is a directory and a process on the machine running terraform.

variable "server_name" {
  description = "Name of the server."
  type        = string
}

variable "region" {
  description = "Ignored by the local target."
  type        = string
  default     = "local"
}

variable "instance_type" {
  description = "Ignored by the local target."
  type        = string
  default     = "local"
}

variable "image" {
  description = "Ignored by the local target."
  type        = string
  default     = "local"
}

variable "disk_size_gb" {
  description = "Ignored by the local target."
  type        = number
  default     = 0
}

variable "ssh_public_keys" {
  description = "Ignored by the local target."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Ignored by the local target."
  type        = map(string)
  default     = {}
}

variable "user_data" {
  description = "The #cloud-config document (holds the one-time bootstrap token)."
  type        = string
  sensitive   = true
}

# Local target only.

variable "local_root" {
  description = "Directory that plays the server's filesystem root. Empty: <working dir>/local-server."
  type        = string
  default     = ""
}

variable "stop_timeout_seconds" {
  description = "At destroy, how long the agent has to exit after SIGTERM before SIGKILL."
  type        = number
  default     = 10
}

variable "keep_failed_root" {
  description = "Keep the root of a server whose boot failed, for inspection (default: removed)."
  type        = bool
  default     = false
}
