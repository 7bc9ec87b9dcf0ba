#!/usr/bin/env python3
"""Proves check_templates.py catches what it claims: copies a module, breaks
it one way at a time, and asserts the checker fails naming the file, the line
and the nearest valid name. Run by `scripts/check-templates.sh --selftest`."""

import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHECKER = HERE / "check_templates.py"


def run_broken(module, old, new, file="main.tf"):
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / module
        shutil.copytree(ROOT / "terraform-templates" / module, dst)
        path = dst / file
        text = path.read_text()
        assert text.count(old) >= 1, f"{old!r} not in {module}/{file}"
        broken = text.replace(old, new, 1)
        path.write_text(broken)
        line = broken[: broken.index(new)].count("\n") + 1 if new else None
        out = subprocess.run([sys.executable, str(CHECKER), tmp], capture_output=True, text=True)
        return out.returncode, out.stdout.replace(tmp + "/", ""), line


class BreakOneThing(unittest.TestCase):
    def assertFinding(self, module, old, new, pattern, file="main.tf", at_change=True):
        code, out, line = run_broken(module, old, new, file)
        self.assertEqual(code, 1, out)
        where = f"{module}/{file}:" + (str(line) if at_change else r"\d+") + ": "
        self.assertRegex(out, where + pattern)

    def test_unmodified_templates_pass(self):
        out = subprocess.run(
            [sys.executable, str(CHECKER), str(ROOT / "terraform-templates")], capture_output=True, text=True
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    # aws (schema from the cdktf-cdktf-provider-aws jsii assembly)
    def test_aws_misspelled_argument_is_named_with_nearest(self):
        self.assertFinding("aws", "  instance_type               = var", "  instance_typ                = var",
                           re.escape('aws_instance.this: unknown argument "instance_typ"; did you mean "instance_type"?'))

    def test_aws_removed_required_argument(self):
        self.assertFinding("aws", '  public_key      = var.ssh_public_keys[0]\n', "",
                           re.escape('aws_key_pair.this: missing required argument "public_key"'), at_change=False)

    def test_aws_wrong_nested_block(self):
        self.assertFinding("aws", "  metadata_options {", "  metadata_option {",
                           re.escape('aws_instance.this: unknown block "metadata_option"; did you mean "metadata_options"?'))

    def test_aws_wrong_block_inside_dynamic(self):
        self.assertFinding("aws", '  dynamic "ingress" {', '  dynamic "ingres" {',
                           re.escape('aws_security_group.this: unknown block "ingres"; did you mean "ingress"?'))

    def test_aws_misspelled_argument_inside_dynamic_content(self):
        self.assertFinding("aws", "      cidr_blocks = var.ssh_source_cidrs", "      cidr_block = var.ssh_source_cidrs",
                           re.escape('aws_security_group.this.ingress: unknown argument "cidr_block"; did you mean "cidr_blocks"?'))

    def test_aws_reference_to_missing_attribute(self):
        self.assertFinding("aws", "aws_instance.this.public_ip\n", "aws_instance.this.public_ipv4\n",
                           re.escape('aws_instance.this: unknown attribute "public_ipv4" of aws_instance; did you mean "public_ip"?'),
                           file="outputs.tf")

    def test_aws_unknown_resource_type(self):
        self.assertFinding("aws", 'resource "aws_key_pair" "this"', 'resource "aws_keypair" "this"',
                           re.escape('resource type "aws_keypair" does not exist in hashicorp/aws'))

    # hetzner (schema file written from the provider's documentation)
    def test_hetzner_misspelled_argument_is_named_with_nearest(self):
        self.assertFinding("hetzner", "  server_type  = var", "  servr_type   = var",
                           re.escape('hcloud_server.this: unknown argument "servr_type"; did you mean "server_type"?'))

    def test_hetzner_removed_required_argument(self):
        self.assertFinding("hetzner", "  public_key = var.ssh_public_keys[count.index]\n", "",
                           re.escape('hcloud_ssh_key.this: missing required argument "public_key"'), at_change=False)

    def test_hetzner_wrong_nested_block(self):
        self.assertFinding("hetzner", "  public_net {", "  public_network {",
                           re.escape('hcloud_server.this: unknown block "public_network"; did you mean "public_net"?'))

    def test_hetzner_wrong_argument_inside_dynamic_content(self):
        self.assertFinding("hetzner", "      destination_ips = rule.value.to", "      destination_ip  = rule.value.to",
                           re.escape('hcloud_firewall.this.rule: unknown argument "destination_ip"; did you mean "destination_ips"?'))

    def test_hetzner_reference_to_missing_attribute(self):
        self.assertFinding("hetzner", "hcloud_server.this.ipv4_address", "hcloud_server.this.ipv4_addr",
                           re.escape('hcloud_server.this: unknown attribute "ipv4_addr" of hcloud_server; did you mean "ipv4_address"?'),
                           file="outputs.tf")


if __name__ == "__main__":
    unittest.main(verbosity=2)
