# Inputs shared by every Tether target. The docker target ignores region,
# instance_type, image, disk_size_gb, ssh_public_keys and tags: the "server"
# is a container on the local Docker engine, with its own address.

variable "server_name" {
  description = "Name of the server (the container is tether-<server_name>)."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", var.server_name))
    error_message = "The server_name must be a valid container name: letters, digits, _ . -"
  }
}

variable "region" {
  description = "Ignored by the docker target."
  type        = string
  default     = "local"
}

variable "instance_type" {
  description = "Ignored by the docker target."
  type        = string
  default     = "container"
}

variable "image" {
  description = "Ignored by the docker target (see container_image)."
  type        = string
  default     = "busybox"
}

variable "disk_size_gb" {
  description = "Ignored by the docker target."
  type        = number
  default     = 0
}

variable "ssh_public_keys" {
  description = "Ignored by the docker target."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Become container labels tether.tag.<key>."
  type        = map(string)
  default     = {}
}

variable "user_data" {
  description = "The #cloud-config document (holds the one-time bootstrap token)."
  type        = string
  sensitive   = true
}

# Docker target only.

variable "docker_network" {
  description = "Bridge network the containers join (made if missing, removed with its last container)."
  type        = string
  default     = "tether"
}

variable "docker_subnet" {
  description = "Subnet of docker_network when it is made. The host (where the control plane must listen) is its first address."
  type        = string
  default     = "172.31.250.0/24"
}

variable "container_ip" {
  description = "The container's address in docker_subnet. Empty: derived from server_name (.10 to .209)."
  type        = string
  default     = ""
}

variable "container_image" {
  description = "Image the containers run: built locally (no pull) from busybox_path plus the host's C library, when missing."
  type        = string
  default     = "tether-busybox:local"
}

variable "busybox_path" {
  description = "A busybox binary on this machine (Debian: busybox-static) for the image."
  type        = string
  default     = "/bin/busybox"
}

variable "keep_failed_root" {
  description = "Keep the container of a server whose boot failed, for inspection (default: removed)."
  type        = bool
  default     = false
}
