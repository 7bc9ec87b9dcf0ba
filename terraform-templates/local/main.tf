# The `local` target: "boots a server" on the machine running terraform.
#
# It reads the same #cloud-config user-data the clouds get, writes its
# `write_files` under a root directory (default <working dir>/local-server)
# and runs the bootstrap script cloud-init's runcmd would run, in `process`
# mode: the agent runs detached, its pid in <root>/run/tether-agent.pid and
# its output in <root>/var/log/tether-agent.log. Destroying the resource
# stops that process (TERM, then KILL) and removes the root. A failed boot
# removes the root at once (unless keep_failed_root): the boot stages posted
# to the control plane and terraform's error say why.
#
# Secrets (the bootstrap token is inside user_data) reach the scripts only
# through their environment, never through a command line.

locals {
  root         = var.local_root != "" ? abspath(var.local_root) : "${abspath(path.cwd)}/local-server"
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
}

resource "terraform_data" "server" {
  input = {
    root                 = local.root
    server_name          = var.server_name
    stop_timeout_seconds = var.stop_timeout_seconds
  }

  # New user-data means a new server.
  triggers_replace = [sha256(var.user_data)]

  provisioner "local-exec" {
    interpreter = ["/bin/sh"]
    command     = "${path.module}/scripts/boot.sh"
    environment = merge(local.file_environment, {
      TETHER_LOCAL_ROOT        = local.root
      TETHER_FILE_COUNT        = tostring(length(local.files))
      TETHER_LOCAL_KEEP_FAILED = tostring(var.keep_failed_root)
    })
  }

  provisioner "local-exec" {
    when        = destroy
    interpreter = ["/bin/sh"]
    command     = "${path.module}/scripts/stop.sh"
    environment = {
      TETHER_LOCAL_ROOT   = self.input.root
      TETHER_STOP_TIMEOUT = tostring(self.input.stop_timeout_seconds)
    }
  }
}
