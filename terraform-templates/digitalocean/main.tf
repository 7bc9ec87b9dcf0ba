# Tether server on DigitalOcean: a droplet booted with the control plane's
# cloud-init user-data, a cloud firewall letting the agent reach its control
# plane (and SSH in only when keys are given or allow_ssh), and the SSH keys.
# Credentials: DIGITALOCEAN_TOKEN from the environment, never a variable.

provider "digitalocean" {}

locals {
  ssh_open = length(var.ssh_public_keys) > 0 || var.allow_ssh
  anywhere = ["0.0.0.0/0", "::/0"]
  tags     = [for k, v in var.tags : replace("${k}:${v}", "/[^A-Za-z0-9:_-]/", "-")]

  egress = var.restrict_egress ? [
    { protocol = "udp", port = tostring(var.control_plane_quic_port), to = [var.control_plane_cidr] },
    { protocol = "tcp", port = tostring(var.control_plane_api_port), to = [var.control_plane_cidr] },
    { protocol = "udp", port = "53", to = local.anywhere },
    { protocol = "tcp", port = "53", to = local.anywhere },
    { protocol = "udp", port = "123", to = local.anywhere },
    { protocol = "tcp", port = "80", to = ["169.254.169.254/32"] }, # droplet metadata
    ] : [
    { protocol = "tcp", port = "1-65535", to = local.anywhere },
    { protocol = "udp", port = "1-65535", to = local.anywhere },
    { protocol = "icmp", port = null, to = local.anywhere },
  ]
}

resource "digitalocean_ssh_key" "this" {
  count      = length(var.ssh_public_keys)
  name       = "${var.server_name}-${count.index}"
  public_key = var.ssh_public_keys[count.index]
}

resource "digitalocean_droplet" "this" {
  name       = var.server_name
  region     = var.region
  size       = var.instance_type
  image      = var.image
  ipv6       = true
  monitoring = false
  ssh_keys   = digitalocean_ssh_key.this[*].fingerprint
  user_data  = var.user_data
  tags       = local.tags
}

resource "digitalocean_firewall" "this" {
  name        = "${var.server_name}-tether"
  droplet_ids = [digitalocean_droplet.this.id]

  dynamic "inbound_rule" {
    for_each = local.ssh_open ? [1] : []
    content {
      protocol         = "tcp"
      port_range       = "22"
      source_addresses = var.ssh_source_cidrs
    }
  }

  dynamic "outbound_rule" {
    for_each = local.egress
    content {
      protocol              = outbound_rule.value.protocol
      port_range            = outbound_rule.value.port
      destination_addresses = outbound_rule.value.to
    }
  }
}
