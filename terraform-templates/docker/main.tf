# The `docker` target: "boots a server" as a container on the local Docker
# engine, with its own address on a bridge network.
#
# Like `local`, it reads the #cloud-config user-data the clouds get
# (yamldecode), but writes its `write_files` into a new container (docker cp
# from a 0700 staging directory, removed at once) and runs the bootstrap
# script inside it (docker exec) in `process` mode. The image is built
# locally when missing, from a busybox binary and the host's C library: no
# registry is contacted. Destroying the resource removes the container (and
# the network once no container uses it). A failed boot removes the
# container at once (unless keep_failed_root).
#
# Secrets (the bootstrap token is inside user_data) reach the scripts only
# through their environment, never through a command line. The control
# plane must be reachable from the container: the user-data's API URL and
# QUIC address should name the `host_address` output (the network's
# gateway), and the control plane must listen there.

locals {
  container = "tether-${var.server_name}"
  gateway   = cidrhost(var.docker_subnet, 1)
  ip = (var.container_ip != "" ? var.container_ip
  : cidrhost(var.docker_subnet, 10 + parseint(substr(sha256(var.server_name), 0, 6), 16) % 200))

  cloud_config = yamldecode(var.user_data)
  files = [
    for f in try(local.cloud_config.write_files, []) : {
      path = f.path
      mode = try(tostring(f.permissions), "0644")
      content = (contains(["b64", "base64"], try(f.encoding, ""))
        ? base64decode(f.content)
      : try(f.content, ""))
    }
  ]
  file_environment = merge([
    for i, f in local.files : {
      "TETHER_FILE_${i}_PATH"    = f.path
      "TETHER_FILE_${i}_MODE"    = f.mode
      "TETHER_FILE_${i}_CONTENT" = f.content
    }
  ]...)
  labels = join("\n", [for k, v in var.tags : "tether.tag.${k}=${v}"])
}

resource "terraform_data" "server" {
  input = {
    container = local.container
    network   = var.docker_network
    ip        = local.ip
  }

  # New user-data means a new server.
  triggers_replace = [sha256(var.user_data)]

  provisioner "local-exec" {
    interpreter = ["/bin/sh"]
    command     = "${path.module}/scripts/up.sh"
    environment = merge(local.file_environment, {
      TETHER_FILE_COUNT        = tostring(length(local.files))
      TETHER_CONTAINER         = local.container
      TETHER_HOSTNAME          = var.server_name
      TETHER_NETWORK           = var.docker_network
      TETHER_SUBNET            = var.docker_subnet
      TETHER_IP                = local.ip
      TETHER_IMAGE             = var.container_image
      TETHER_BUSYBOX           = var.busybox_path
      TETHER_LABELS            = local.labels
      TETHER_LOCAL_KEEP_FAILED = tostring(var.keep_failed_root)
    })
  }

  provisioner "local-exec" {
    when        = destroy
    interpreter = ["/bin/sh"]
    command     = "${path.module}/scripts/down.sh"
    environment = {
      TETHER_CONTAINER = self.input.container
      TETHER_NETWORK   = self.input.network
    }
  }
}
