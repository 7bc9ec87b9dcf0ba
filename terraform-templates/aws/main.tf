# Tether server on AWS: an EC2 instance booted with the control plane's
# cloud-init user-data, a security group letting the agent reach its control
# plane (and SSH in only when keys are given or allow_ssh), and a key pair
# when keys are given. Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
# (and AWS_SESSION_TOKEN) from the environment, never a variable.

provider "aws" {
  region = var.region
}

locals {
  ssh_open = length(var.ssh_public_keys) > 0 || var.allow_ssh
  arm64    = contains(data.aws_ec2_instance_type.this.supported_architectures, "arm64")
  ami      = var.image != "" ? var.image : data.aws_ami.ubuntu[0].id
  tags     = merge(var.tags, { Name = var.server_name })

  # A key pair holds one key; cloud-init authorizes the others.
  user_data = (length(var.ssh_public_keys) > 1
    ? "#cloud-config\n${yamlencode(merge(yamldecode(var.user_data), {
      ssh_authorized_keys = slice(var.ssh_public_keys, 1, length(var.ssh_public_keys))
    }))}"
  : var.user_data)

  egress = [
    { description = "Tether control plane QUIC", protocol = "udp", port = var.control_plane_quic_port, cidr = var.control_plane_cidr },
    { description = "Tether control plane API", protocol = "tcp", port = var.control_plane_api_port, cidr = var.control_plane_cidr },
    { description = "DNS", protocol = "udp", port = 53, cidr = "0.0.0.0/0" },
    { description = "DNS over TCP", protocol = "tcp", port = 53, cidr = "0.0.0.0/0" },
    { description = "NTP", protocol = "udp", port = 123, cidr = "0.0.0.0/0" },
  ]
}

data "aws_ec2_instance_type" "this" {
  instance_type = var.instance_type
}

data "aws_ami" "ubuntu" {
  count       = var.image == "" ? 1 : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-${local.arm64 ? "arm64" : "amd64"}-server-*"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

data "aws_subnet" "selected" {
  count = var.subnet_id != "" ? 1 : 0
  id    = var.subnet_id
}

resource "aws_key_pair" "this" {
  count           = length(var.ssh_public_keys) > 0 ? 1 : 0
  key_name_prefix = "${var.server_name}-"
  public_key      = var.ssh_public_keys[0]
  tags            = local.tags
}

resource "aws_security_group" "this" {
  name_prefix = "${var.server_name}-"
  description = "Tether agent: outbound to its control plane"
  vpc_id      = var.subnet_id != "" ? data.aws_subnet.selected[0].vpc_id : null
  tags        = local.tags

  dynamic "ingress" {
    for_each = local.ssh_open ? [1] : []
    content {
      description = "SSH"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = var.ssh_source_cidrs
    }
  }

  dynamic "egress" {
    for_each = var.restrict_egress ? local.egress : []
    content {
      description = egress.value.description
      from_port   = egress.value.port
      to_port     = egress.value.port
      protocol    = egress.value.protocol
      cidr_blocks = [egress.value.cidr]
    }
  }

  dynamic "egress" {
    for_each = var.restrict_egress ? [] : [1]
    content {
      description      = "All outbound traffic"
      from_port        = 0
      to_port          = 0
      protocol         = "-1"
      cidr_blocks      = ["0.0.0.0/0"]
      ipv6_cidr_blocks = ["::/0"]
    }
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_instance" "this" {
  ami                         = local.ami
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id != "" ? var.subnet_id : null
  vpc_security_group_ids      = [aws_security_group.this.id]
  key_name                    = length(aws_key_pair.this) > 0 ? aws_key_pair.this[0].key_name : null
  associate_public_ip_address = var.associate_public_ip
  user_data                   = local.user_data
  user_data_replace_on_change = true
  tags                        = local.tags
  volume_tags                 = local.tags

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required"
  }

  root_block_device {
    volume_size           = var.disk_size_gb
    volume_type           = "gp3"
    encrypted             = true
    delete_on_termination = true
  }

  lifecycle {
    # A newer Ubuntu AMI must not replace a running server.
    ignore_changes = [ami]
  }
}
