"""Secrets stay out of the index: credential files by name and content, with an opt-in."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repd.core.secrets import SecretPolicy, secret_content, secret_name
from tests.helpers import cli_env, run_cli


def _b64(n: int, seed: int) -> str:
    return base64.b64encode(bytes((i * 131 + seed * 17 + i // 7) % 256 for i in range(n))).decode()


def _pem(kind: str, seed: int) -> str:
    body = _b64(400, seed)
    lines = "\n".join(body[i:i + 70] for i in range(0, len(body), 70))
    return f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----\n"


# Distinct, realistic tokens (built from parts so that this file itself trips no scanner).
AWS = "AKIA" + "Q3EGRPLWZ5JN6BXU"
GITHUB = "gho" + "_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A"
SLACK = "xoxb" + "-2931846501-7364051928374-AbCdEfGhIjKlMnOpQrStUvWx"
OPENSSH = _pem("OPENSSH PRIVATE KEY", 1)
ALLOWED_KEY = _pem("PRIVATE KEY", 2)


@pytest.mark.parametrize("path", [
    "/h/.config/gh/hosts.yml", "/h/.cargo/credentials.toml", "/h/.cargo/credentials",
    "/h/.config/gcloud/application_default_credentials.json",
    "/p/application_default_credentials.json", "/h/.config/git/credentials", "/h/.my.cnf",
    "/k/server.PPK", "/h/.bash_history", "/h/.zsh_history", "/h/.python_history",
    "/h/.local/share/fish/fish_history", "/h/.psql_history", "/h/.mysql_history",
    "/h/.node_repl_history", "/p/secrets.yaml", "/p/secrets.yml", "/p/secrets.json",
    "/p/.streamlit/secrets.toml", "/p/prod.tfvars", "/p/terraform.tfstate",
    "/p/terraform.tfstate.backup", "/p/prod.env", "/p/.env", "/p/.env.local",
    "/h/.config/sops/age/keys.txt", "/h/.m2/settings.xml", "/h/.config/rclone/rclone.conf",
    "/p/kubeconfig", "/p/dev.kubeconfig", "/h/.terraformrc", "/p/credentials.json",
    "/p/token.json", "/h/.docker/config.json", "/p/id_rsa", "/p/id_ed25519.pub",
    "/p/tls.key", "/p/cert.pem", "/h/.netrc", "/h/.pgpass", "/h/.git-credentials",
    "/p/client_secret_123.apps.json", "/p/vault.kdbx", "/h/.npmrc", "/h/.pypirc",
])
def test_credential_files_are_known_by_name(path: str) -> None:
    assert secret_name(path), path


@pytest.mark.parametrize("path", [
    "/p/notes.md", "/p/env.md", "/p/environment.txt", "/p/history.md", "/p/family_history",
    "/p/keys.txt", "/p/settings.xml", "/p/config.json", "/p/credentials.md", "/p/my.cnf.md",
    "/p/hosts.yml", "/p/.config/other/hosts.yml", "/p/key-points.md", "/p/secrets.md",
])
def test_ordinary_files_are_not_secrets_by_name(path: str) -> None:
    assert secret_name(path) is None, path


@pytest.mark.parametrize(("text", "kind"), [
    (OPENSSH, "an OpenSSH private key"),
    (_pem("RSA PRIVATE KEY", 3), "an RSA private key"),
    (_pem("EC PRIVATE KEY", 4), "an EC private key"),
    (_pem("PRIVATE KEY", 5), "a PKCS#8 private key"),
    (_pem("ENCRYPTED PRIVATE KEY", 6), "an encrypted private key"),
    ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nComment: x\n\n" + _b64(300, 7),
     "a PGP private key block"),
    ("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0A1B\n\n"
     + _b64(300, 8), "an RSA private key"),
    ("PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n", "a PuTTY private key"),
    (f"aws_access_key_id = {AWS}\n", "an AWS access key"),
    (f"token: {GITHUB}\n", "a GitHub token"),
    ("github_pat_" + "Ab1" * 27 + "Z", "a GitHub token"),
    ("glpat" + "-AbCdEf1234567890GhIj", "a GitLab token"),
    (f"SLACK={SLACK}", "a Slack token"),
    ("sk_live" + "_4eC39HqLyjWDarjtT1zdp7dc", "a Stripe key"),
    ("key=AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "a Google API key"),
    ("sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv" + "T3BlbkFJ"
     + "Wx1Yz2Ab3Cd4Ef5Gh6Ij7Kl8Mn9Op0Qr", "an OpenAI API key"),
    ("AGE-SECRET-KEY-1" + "QYZ3KGJ8PWX5L2M9D7F4H6N0R1T3V5B8C2E4G6J8K0M2P4S6U8W0Y2A4C6",
     "an age secret key"),
    ("\ufeff" + f"id {AWS}", "an AWS access key"),
])
def test_secrets_are_found_by_content(text: str, kind: str) -> None:
    if text.startswith("\ufeff"):  # UTF-16 text (with its BOM) is decoded before the scan
        assert secret_content(("Notes.\n" * 2000 + text[1:]).encode("utf-16")) == kind
        return
    assert secret_content(text.encode()) == kind
    # Anywhere in the file, not only near the top.
    assert secret_content(b"An ordinary paragraph of notes.\n" * 2000 + text.encode()) == kind


@pytest.mark.parametrize("text", [
    "Keys start with -----BEGIN RSA PRIVATE KEY----- and end with an END line.",
    "AWS documents AKIAIOSFODNN7EXAMPLE as its sample access key id.",
    "A GitHub token looks like ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx (40 characters).",
    "The JWT eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n",
    "Prefixes such as sk-, ghp_, xoxb- and AKIA mean a token follows.",
    "MYAKIAQ3EGRPLWZ5JN6BXU is glued to a longer word",
    "-----BEGIN CERTIFICATE-----\n" + _b64(300, 9) + "\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\n" + _b64(300, 10) + "\n-----END PUBLIC KEY-----",
])
def test_look_alikes_are_not_secrets(text: str) -> None:
    assert secret_content(text.encode()) is None


def test_content_scan_is_linear_on_hostile_input() -> None:
    # Each pattern starts with a literal and repeats boundedly; these inputs make a
    # backtracking pattern retry at every offset. A functional bound, not a micro-timing:
    # run in a child so a regression that explodes is cut off instead of hanging the suite.
    code = textwrap.dedent("""
        import time
        from repd.core.secrets import secret_content
        inputs = [b"-----BEGIN PRIVATE KEY-----\\n" * 150_000,
                  (b"-----BEGIN PRIVATE KEY-----\\nAa: " + b"x" * 290 + b"\\n") * 12_000,
                  b"xoxb-1234567-" * 300_000, b"sk-" + b"A" * 4_000_000,
                  b"AKIA" * 1_000_000, b"ghp_" * 1_000_000]
        t0 = time.process_time()
        for data in inputs:
            secret_content(data)
        print(time.process_time() - t0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert float(out.stdout) < 5.0, out.stdout  # ~24 MB in all; about 0.5 s here


def test_policy_opt_in_by_glob() -> None:
    policy = SecretPolicy(("docs/*.pem", "fixtures/"))
    assert policy.name_verdict("/r/docs/sample.pem", "docs/sample.pem") is None
    assert policy.content_verdict("fixtures/a/key.txt", OPENSSH.encode()) is None
    assert policy.name_verdict("/r/other/sample.pem", "other/sample.pem")
    assert policy.content_verdict("notes.md", OPENSSH.encode()) == "contains an OpenSSH private key"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_folder_of_secrets_is_not_searchable(tmp_path: Path) -> None:
    """Real `repd index`, `repd query` and `repd files` over a folder of credentials."""
    root = tmp_path / "root"
    secrets = {
        # by content, under innocent names
        "deploy_key": OPENSSH,
        "notes.md": f"# Budget\n\nThe glacier budget meeting notes.\n\nkey {AWS}\n",
        "chat-log.txt": "Long chat about volcanoes and lava.\n" * 400 + f"bot {SLACK}\n",
        "private.asc": "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n" + _b64(300, 11) + "\n",
        # by name (the content is ordinary prose, so only the name can catch it)
        ".config/gh/hosts.yml": f"github.com:\n  oauth_token: {GITHUB}\n  user: volcano\n",
        ".cargo/credentials.toml": "[registry]\ntoken = 'the cargo registry glacier token'\n",
        "application_default_credentials.json": '{"note": "glacier application credentials"}',
        ".my.cnf": "[client]\npassword = glacier volcano mysql password\n",
        "putty.ppk": "glacier volcano putty key notes\n",
        "fish_history": "- cmd: export TOKEN=glacier volcano shell history\n",
        "secrets.yaml": "api: glacier volcano application secrets\n",
        ".streamlit/secrets.toml": "db = 'glacier volcano streamlit secrets'\n",
        "prod.tfvars": "db_password = \"glacier volcano terraform\"\n",
        "prod.env": "DATABASE_PASSWORD=glacier-volcano-env\n",
        ".config/sops/age/keys.txt": "# created: glacier volcano age keys\n",
        ".m2/settings.xml": "<settings><password>glacier volcano maven</password></settings>\n",
        "rclone.conf": "[remote]\npass = glacier volcano rclone\n",
        "token.json": '{"refresh_token": "glacier volcano oauth token"}',
    }
    for rel, text in secrets.items():
        _write(root / rel, text)
    _write(root / "ordinary.md", "Glaciers and volcanoes: ordinary field notes.\n")
    _write(root / "docs" / "sample.pem", "Sample key for the TLS tutorial.\n" + ALLOWED_KEY)
    config = tmp_path / "config.toml"
    config.write_text('allow_secrets = ["docs/sample.pem"]\n')
    env = cli_env(tmp_path / "home", REPD_CONFIG=str(config))

    indexed = run_cli(["index", str(root), "--json"], env)
    summary = json.loads(indexed.stdout)
    assert summary["indexed"] == 2, summary
    assert summary["skipped"].get("secret") == len(secrets), summary

    # k=100 is more than the whole index holds: every indexed chunk comes back.
    hits = json.loads(run_cli(["query", "glacier volcano password token key", "-k", "100",
                               "--json"], env).stdout)["hits"]
    assert {h["path"] for h in hits} == {"ordinary.md", "docs/sample.pem"}

    listing = json.loads(run_cli(["files", "--json"], env).stdout)["items"]
    reasons = {it["path"]: (it["reason"], it["detail"]) for it in listing}
    assert {p for p, (r, _) in reasons.items() if r == "secret"} == set(secrets)
    assert reasons["deploy_key"][1] == "contains an OpenSSH private key"
    assert reasons["notes.md"][1] == "contains an AWS access key"
    assert reasons["chat-log.txt"][1] == "contains a Slack token"
    assert "GitHub CLI" in reasons[".config/gh/hosts.yml"][1]

    # The secret itself is in no output, no log and no file of the index; the allowed
    # key is (which shows that the search below can find what is there).
    data_dir = tmp_path / "home" / "data" / "repd"
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    text_out = indexed.stdout + indexed.stderr + json.dumps(listing)
    for token in (AWS, GITHUB, SLACK, OPENSSH.splitlines()[1]):
        assert token not in text_out
        assert token.encode() not in stored, token
    assert ALLOWED_KEY.splitlines()[1].encode() in stored
    assert os.path.exists(root / "deploy_key")  # nothing was touched on disk
