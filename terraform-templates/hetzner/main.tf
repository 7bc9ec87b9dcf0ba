# Tether server on Hetzner Cloud: a server booted with the control plane's
# cloud-init user-data, a firewall letting the agent reach its control plane
# (and SSH in only when keys are given or allow_ssh), and the SSH keys.
# Credentials: HCLOUD_TOKEN from the environment, never a variable.
# Without ssh_public_keys Hetzner would mail a root password; SSH stays
# closed by the firewall unless allow_ssh.

provider "hcloud" {}

locals {
  ssh_open = length(var.ssh_public_keys) > 0 || var.allow_ssh
  anywhere = ["0.0.0.0/0", "::/0"]
  labels = {
    for k, v in var.tags :
    substr(replace(k, "/[^A-Za-z0-9._-]/", "_"), 0, 63) => substr(replace(v, "/[^A-Za-z0-9._-]/", "_"), 0, 63)
  }

  # Hetzner allows all outbound traffic while a firewall has no outbound rule.
  egress = var.restrict_egress ? [
    { description = "Tether control plane QUIC", protocol = "udp", port = tostring(var.control_plane_quic_port), to = [var.control_plane_cidr] },
    { description = "Tether control plane API", protocol = "tcp", port = tostring(var.control_plane_api_port), to = [var.control_plane_cidr] },
    { description = "DNS", protocol = "udp", port = "53", to = local.anywhere },
    { description = "DNS over TCP", protocol = "tcp", port = "53", to = local.anywhere },
    { description = "NTP", protocol = "udp", port = "123", to = local.anywhere },
    { description = "Server metadata", protocol = "tcp", port = "80", to = ["169.254.169.254/32"] },
  ] : []
}

resource "hcloud_ssh_key" "this" {
  count      = length(var.ssh_public_keys)
  name       = "${var.server_name}-${count.index}"
  public_key = var.ssh_public_keys[count.index]
  labels     = local.labels
}

resource "hcloud_firewall" "this" {
  name   = "${var.server_name}-tether"
  labels = local.labels

  dynamic "rule" {
    for_each = local.ssh_open ? [1] : []
    content {
      description = "SSH"
      direction   = "in"
      protocol    = "tcp"
      port        = "22"
      source_ips  = var.ssh_source_cidrs
    }
  }

  dynamic "rule" {
    for_each = local.egress
    content {
      description     = rule.value.description
      direction       = "out"
      protocol        = rule.value.protocol
      port            = rule.value.port
      destination_ips = rule.value.to
    }
  }
}

resource "hcloud_server" "this" {
  name         = var.server_name
  server_type  = var.instance_type
  image        = var.image
  location     = var.region
  ssh_keys     = hcloud_ssh_key.this[*].id
  user_data    = var.user_data
  labels       = local.labels
  firewall_ids = [hcloud_firewall.this.id]

  public_net {
    ipv4_enabled = true
    ipv6_enabled = true
  }
}
