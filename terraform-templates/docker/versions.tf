# The docker target needs no provider: only the built-in `terraform_data`
# resource and the `local-exec` provisioner (terraform >= 1.4), plus the
# docker CLI talking to a local engine.
terraform {
  required_version = ">= 1.4"
}
