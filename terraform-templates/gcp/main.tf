# Tether server on Google Cloud: a Compute Engine instance booted with the
# control plane's cloud-init user-data (metadata `user-data`) and firewall
# rules, bound to the instance by a network tag, letting the agent reach its
# control plane (and SSH in only when keys are given or allow_ssh).
# Credentials: GOOGLE_CREDENTIALS (and GOOGLE_PROJECT unless `project` is set)
# from the environment, never a variable.

provider "google" {
  project = var.project != "" ? var.project : null
  region  = var.region
}

locals {
  ssh_open = length(var.ssh_public_keys) > 0 || var.allow_ssh
  zone     = var.zone != "" ? var.zone : "${var.region}-b"
  tag      = substr("tether-${var.server_name}", 0, 63)
  labels = {
    for k, v in var.tags :
    substr(lower(replace(k, "/[^A-Za-z0-9_-]/", "_")), 0, 63) => substr(lower(replace(v, "/[^A-Za-z0-9_-]/", "_")), 0, 63)
  }
  ssh_keys = join("\n", [for key in var.ssh_public_keys : "${var.ssh_user}:${trimspace(key)}"])
}

resource "google_compute_instance" "this" {
  name         = var.server_name
  machine_type = var.instance_type
  zone         = local.zone
  tags         = [local.tag]
  labels       = local.labels

  boot_disk {
    initialize_params {
      image = var.image
      size  = var.disk_size_gb
    }
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork != "" ? var.subnetwork : null

    access_config {}
  }

  metadata = merge(
    { "user-data" = var.user_data },
    length(var.ssh_public_keys) > 0 ? { "ssh-keys" = local.ssh_keys } : {},
  )
}

resource "google_compute_firewall" "ssh" {
  count         = local.ssh_open ? 1 : 0
  name          = "${var.server_name}-ssh"
  network       = var.network
  direction     = "INGRESS"
  source_ranges = var.ssh_source_cidrs
  target_tags   = [local.tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}

# With restrict_egress: the control plane, DNS and NTP are allowed, anything
# else denied. (The metadata server is never filtered by firewall rules.)

resource "google_compute_firewall" "control_plane" {
  count              = var.restrict_egress ? 1 : 0
  name               = "${var.server_name}-control-plane"
  network            = var.network
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = [var.control_plane_cidr]
  target_tags        = [local.tag]

  allow {
    protocol = "udp"
    ports    = [tostring(var.control_plane_quic_port)]
  }

  allow {
    protocol = "tcp"
    ports    = [tostring(var.control_plane_api_port)]
  }
}

resource "google_compute_firewall" "dns_ntp" {
  count              = var.restrict_egress ? 1 : 0
  name               = "${var.server_name}-dns-ntp"
  network            = var.network
  direction          = "EGRESS"
  priority           = 1000
  destination_ranges = ["0.0.0.0/0"]
  target_tags        = [local.tag]

  allow {
    protocol = "udp"
    ports    = ["53", "123"]
  }

  allow {
    protocol = "tcp"
    ports    = ["53"]
  }
}

resource "google_compute_firewall" "deny_egress" {
  count              = var.restrict_egress ? 1 : 0
  name               = "${var.server_name}-deny-egress"
  network            = var.network
  direction          = "EGRESS"
  priority           = 65000
  destination_ranges = ["0.0.0.0/0"]
  target_tags        = [local.tag]

  deny {
    protocol = "all"
  }
}
