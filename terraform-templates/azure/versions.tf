terraform {
  required_version = ">= 1.5"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
    # Only for a throwaway admin key when no ssh_public_keys are given
    # (Azure requires one). Its private key only lives in the Terraform
    # state, and inbound SSH stays closed unless allow_ssh.
    tls = {
      source  = "hashicorp/tls"
      version = "~> 4.0"
    }
  }
}
