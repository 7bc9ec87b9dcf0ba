# The local target needs no provider: only the built-in `terraform_data`
# resource and the `local-exec` provisioner (terraform >= 1.4).
terraform {
  required_version = ">= 1.4"
}
