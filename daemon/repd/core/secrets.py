"""Which files are credentials, by name or by content: the one list repd keeps secrets out by.

Three layers, all applied by default:

* ``SECRET_DIRS``: folders left out whole and never walked (``.ssh``, ``.gnupg``...);
  :mod:`repd.core.ignore` uses them as hard rules.
* ``NAME_RULES``: credential files by name or path tail (``.env``, ``*.pem``,
  ``.config/gh/hosts.yml``...). The planner checks these before reading a byte and
  records the file as skipped with reason ``secret``, so ``repd files`` shows it.
* ``TOKEN_RULES``: a scan of the file's bytes for private-key blocks and well-known token
  formats (an OpenSSH key saved as ``deploy_key``, an AWS key pasted into ``notes.md``).
  The detail names only the kind of secret, never the secret.

The lists follow the conventions of secret scanners, cited per family: gitleaks
(``config/gitleaks.toml``), trufflehog detectors, GitHub secret scanning's supported
patterns, and GitHub's ``gitignore`` templates. Every regex has a literal prefix and only
bounded repetitions, so a scan is linear in the file's size whatever its content.

A person opts a path back in with ``allow_secrets``: gitignore-style globs relative to the
root (``allow_secrets = ["docs/examples/*.pem"]``), which lift both the name and the
content rules for the files they match. Secret folders stay out regardless: allowing a
file inside ``.ssh`` needs the folder out of ``SECRET_DIRS`` first, which is deliberate.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pathspec import GitIgnoreSpec

# --- folders: left out whole, never walked -----------------------------------------------
# OpenSSH, GnuPG, AWS/Azure CLIs, kubectl, Docker, pass(1): each keeps credentials (and
# little else) in its own dot-folder.
SECRET_DIRS = frozenset(
    {".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store"}
)

# --- files by name -------------------------------------------------------------------------
# A rule without "/" is matched against the file name, case-insensitively: ``name``
# exactly, ``pre*`` by prefix, ``*suf`` by suffix, ``pre*suf`` both. A rule with "/" is
# matched against the end of the file's absolute path, so ``.config/gh/hosts.yml`` is found
# whatever folder is the root; a rule ending in "/" covers every file below that folder.
NAME_RULES: tuple[tuple[str, str], ...] = (
    # Private keys and keystores (gitleaks "private-key"; GitHub's gitignore templates).
    ("id_rsa*", "SSH private key file"),
    ("id_dsa*", "SSH private key file"),
    ("id_ecdsa*", "SSH private key file"),
    ("id_ed25519*", "SSH private key file"),
    ("*.pem", "PEM key or certificate file"),
    ("*.key", "private key file"),
    ("*.ppk", "PuTTY private key file"),
    ("*.p12", "PKCS#12 keystore"),
    ("*.pfx", "PKCS#12 keystore"),
    ("*.jks", "Java keystore"),
    ("*.keystore", "keystore"),
    ("*.kdbx", "KeePass database"),
    ("*.kdb", "KeePass database"),
    (".config/sops/age/keys.txt", "age private keys (sops)"),
    # dotenv files (the dotenv convention; GitHub's Node/Python gitignore templates).
    (".env", "environment file"),
    (".env.*", "environment file"),
    ("*.env", "environment file"),
    (".envrc", "direnv environment file"),
    # Shell and REPL histories: typed passwords and tokens (trufflehog scans them too).
    (".*_history", "shell or REPL history"),
    ("fish_history", "shell history"),
    (".history", "shell history"),
    (".histfile", "shell history"),
    (".rhistory", "R history"),
    (".lesshst", "less history"),
    # Version control and package-registry credentials (gitleaks "npm-access-token",
    # "pypi-upload-token"; the tools' documented credential files).
    (".git-credentials", "git credential store"),
    (".config/git/credentials", "git credential store"),
    (".netrc", "netrc credentials"),
    ("_netrc", "netrc credentials"),
    (".npmrc", "npm credentials"),
    (".pypirc", "PyPI credentials"),
    (".cargo/credentials", "Cargo registry token"),
    (".cargo/credentials.toml", "Cargo registry token"),
    (".gem/credentials", "RubyGems API key"),
    (".m2/settings.xml", "Maven settings (server passwords)"),
    (".m2/settings-security.xml", "Maven master password"),
    (".ivy2/.credentials", "Ivy/sbt credentials"),
    (".gradle/gradle.properties", "Gradle user properties (credentials)"),
    (".config/composer/auth.json", "Composer credentials"),
    (".composer/auth.json", "Composer credentials"),
    (".config/gh/hosts.yml", "GitHub CLI token file"),
    (".config/hub", "hub GitHub token file"),
    (".config/glab-cli/config.yml", "GitLab CLI token file"),
    # Cloud and infrastructure tools (trufflehog's GCP/AWS/Azure detectors; the Terraform
    # gitignore template; each CLI's documented credential file).
    ("credentials*.json", "cloud credentials"),
    ("client_secret*.json", "OAuth client secret"),
    ("service-account*.json", "cloud service-account key"),
    ("application_default_credentials.json", "Google Cloud credentials"),
    (".config/gcloud/", "Google Cloud CLI credentials"),
    ("token.json", "OAuth token"),
    (".credentials.json", "stored credentials"),
    (".codex/auth.json", "Codex CLI credentials"),
    (".boto", "AWS/GCS boto credentials"),
    (".s3cfg", "s3cmd credentials"),
    ("rclone.conf", "rclone remotes (credentials)"),
    (".config/doctl/config.yaml", "DigitalOcean CLI token"),
    (".config/hcloud/cli.toml", "Hetzner Cloud CLI token"),
    (".oci/config", "Oracle Cloud CLI config"),
    (".vault-token", "Vault token"),
    (".terraformrc", "Terraform CLI credentials"),
    ("terraform.rc", "Terraform CLI credentials"),
    (".terraform.d/credentials.tfrc.json", "Terraform Cloud token"),
    ("*.tfvars", "Terraform variables"),
    ("*.tfvars.json", "Terraform variables"),
    ("*.tfstate", "Terraform state"),
    ("*.tfstate.backup", "Terraform state"),
    ("kubeconfig", "Kubernetes credentials"),
    ("kubeconfig.*", "Kubernetes credentials"),
    ("*.kubeconfig", "Kubernetes credentials"),
    (".dockercfg", "Docker registry credentials"),
    (".docker/config.json", "Docker registry credentials"),
    # Databases and web servers (the tools' documented password files).
    (".pgpass", "PostgreSQL password file"),
    (".my.cnf", "MySQL client config (password)"),
    (".mylogin.cnf", "MySQL login path (password)"),
    (".htpasswd", "HTTP password file"),
    ("wp-config.php", "WordPress config (database password)"),
    # Application secrets files (Streamlit, Rails, Kubernetes/Helm, Home Assistant...).
    ("secrets.yaml", "secrets file"),
    ("secrets.yml", "secrets file"),
    ("secrets.json", "secrets file"),
    ("secrets.toml", "secrets file"),
)


@dataclass(frozen=True, slots=True)
class _NameIndex:
    exact: dict[str, str]
    prefixes: tuple[tuple[str, str], ...]
    suffixes: tuple[tuple[str, str], ...]
    both: tuple[tuple[str, str, str], ...]
    tails: tuple[tuple[str, str], ...]  # "/a/b/name" or "/a/b/" (folder), lower case


def _index(rules: Sequence[tuple[str, str]]) -> _NameIndex:
    exact: dict[str, str] = {}
    prefixes: list[tuple[str, str]] = []
    suffixes: list[tuple[str, str]] = []
    both: list[tuple[str, str, str]] = []
    tails: list[tuple[str, str]] = []
    for pattern, kind in rules:
        rule = pattern.lower()
        if "/" in rule:
            tails.append(("/" + rule, kind))
        elif "*" not in rule:
            exact[rule] = kind
        elif rule.endswith("*") and rule.count("*") == 1:
            prefixes.append((rule[:-1], kind))
        elif rule.startswith("*") and rule.count("*") == 1:
            suffixes.append((rule[1:], kind))
        elif rule.count("*") == 1:
            pre, _, suf = rule.partition("*")
            both.append((pre, suf, kind))
        else:
            raise ValueError(f"unsupported secret name rule {pattern!r}")
    return _NameIndex(exact, tuple(prefixes), tuple(suffixes), tuple(both), tuple(tails))


_NAMES = _index(NAME_RULES)


def secret_name(path: str) -> str | None:
    """What kind of credential file ``path`` is by its name, or None.

    ``path`` should be absolute (or at least include the folders a rule may name).
    """
    lower = path.lower()
    name = lower.rpartition("/")[2]
    kind = _NAMES.exact.get(name)
    if kind is not None:
        return kind
    for pre, kind in _NAMES.prefixes:
        if name.startswith(pre):
            return kind
    for suf, kind in _NAMES.suffixes:
        if name.endswith(suf) and len(name) > len(suf):
            return kind
    for pre, suf, kind in _NAMES.both:
        if len(name) >= len(pre) + len(suf) and name.startswith(pre) and name.endswith(suf):
            return kind
    for tail, kind in _NAMES.tails:
        if (tail.endswith("/") and tail in lower) or lower.endswith(tail):
            return kind
    return None


# --- content --------------------------------------------------------------------------------
# A token must not be glued to more token characters on either side. The left side is
# checked in Python (see _glued): a lookbehind in front of the literal would stop the regex
# engine from jumping between occurrences of the literal, making each scan ~30x slower.
_E = rb"(?![A-Za-z0-9_])"
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

TOKEN_RULES: tuple[tuple[str, bytes], ...] = (
    # PEM and OpenSSH private keys with a body (gitleaks "private-key"; GitHub secret
    # scanning). A bare header line, as in documentation about key formats, does not count.
    ("a private key",
     rb"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----[\r\n]+"
     rb"(?:[A-Za-z][A-Za-z-]{0,40}: [^\r\n]{0,300}[\r\n]+){0,6}[\r\n]*[A-Za-z0-9+/=]{40}"),
    # PuTTY's .ppk format (trufflehog "PrivateKey").
    ("a PuTTY private key", rb"PuTTY-User-Key-File-[23]: [a-z0-9-]{3,40}[\r\n]"),
    # age (and sops) secret keys (gitleaks "age-secret-key").
    ("an age secret key", rb"AGE-SECRET-KEY-1[0-9A-Z]{58}"),
    # AWS access key ids (gitleaks "aws-access-token"; GitHub secret scanning).
    ("an AWS access key", rb"A(?:KIA|SIA|BIA|CCA)[A-Z2-7]{16}" + _E),
    # GitHub tokens (GitHub's documented token formats; gitleaks "github-*").
    ("a GitHub token", rb"gh[pousr]_[0-9A-Za-z]{36}" + _E),
    ("a GitHub token", rb"github_pat_[0-9A-Za-z_]{82}" + _E),
    # GitLab tokens (GitLab's token prefixes; gitleaks "gitlab-*").
    ("a GitLab token", rb"gl(?:pat|dt|rt|ptt|cbt|oas)-[0-9A-Za-z_-]{20,64}" + _E),
    # Slack tokens and webhooks (gitleaks "slack-*"; GitHub secret scanning).
    ("a Slack token", rb"xox[baprse]-[0-9]{6,14}-[0-9A-Za-z-]{8,200}"),
    ("a Slack webhook",
     rb"hooks\.slack\.com/(?:services|workflows)/T[0-9A-Z]{6,12}/[0-9A-Za-z/]{20,80}"),
    # Stripe live secret and restricted keys (gitleaks "stripe-access-token").
    ("a Stripe key", rb"[rs]k_live_[0-9A-Za-z]{20,99}" + _E),
    # Google API keys and OAuth client secrets (gitleaks "gcp-api-key"; GitHub scanning).
    ("a Google API key", rb"AIza[0-9A-Za-z_-]{35}" + _E),
    ("a Google OAuth client secret", rb"GOCSPX-[0-9A-Za-z_-]{28}" + _E),
    # OpenAI keys carry "T3BlbkFJ" ("OpenAI" in base64) in the middle (gitleaks "openai").
    ("an OpenAI API key",
     rb"sk-(?:(?:proj|svcacct|admin)-)?[0-9A-Za-z_-]{20,74}T3BlbkFJ[0-9A-Za-z_-]{20,74}" + _E),
    # Anthropic keys (gitleaks "anthropic-api-key").
    ("an Anthropic API key", rb"sk-ant-(?:api|admin)0[0-9]-[0-9A-Za-z_-]{80,100}" + _E),
    # Hugging Face, npm, PyPI, DigitalOcean, SendGrid (gitleaks rules of those names).
    ("a Hugging Face token", rb"hf_[A-Za-z]{34}" + _E),
    ("an npm token", rb"npm_[0-9A-Za-z]{36}" + _E),
    ("a PyPI token", rb"pypi-AgEIcHlwaS5vcmc[0-9A-Za-z_-]{50,300}"),
    ("a DigitalOcean token", rb"do[opr]_v1_[0-9a-f]{64}" + _E),
    ("a SendGrid key", rb"SG\.[0-9A-Za-z_-]{22}\.[0-9A-Za-z_-]{43}" + _E),
)
# Left out on purpose: JWTs (short-lived, and every tutorial and test suite carries
# sample ones), generic "password=..." assignments (too many false positives in prose
# and code), and Twilio-style bare hex ids (indistinguishable from hashes).

_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in TOKEN_RULES)
_KEY_KIND = re.compile(rb"-----BEGIN ([ A-Z0-9]{0,40}?) ?PRIVATE KEY")
_KEY_NAMES = {
    b"OPENSSH": "an OpenSSH private key",
    b"RSA": "an RSA private key",
    b"EC": "an EC private key",
    b"DSA": "a DSA private key",
    b"ENCRYPTED": "an encrypted private key",
    b"PGP": "a PGP private key block",
    b"": "a PKCS#8 private key",
}
# Placeholders such as "ghp_xxxx..." or AWS's documented AKIAIOSFODNN7EXAMPLE are not
# secrets; a real token of these lengths has many distinct characters.
_MIN_DISTINCT = 10
_PLACEHOLDER_WORDS = (b"EXAMPLE", b"example", b"XXXXXXXX", b"xxxxxxxx")


def _plausible(kind: str, token: bytes) -> bool:
    if kind.endswith("private key") or "PuTTY" in kind:
        return True
    if any(w in token for w in _PLACEHOLDER_WORDS):
        return False
    return len(set(token)) >= _MIN_DISTINCT


def _as_ascii_bytes(data: bytes) -> bytes:
    # UTF-16/32 text would hide every token from byte patterns: decode it first.
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(codec, "replace").encode("utf-8", "replace")
    return data


def secret_content(data: bytes) -> str | None:
    """The kind of the first secret found in ``data`` (``"an OpenSSH private key"``), or None.

    Scans all of ``data``: each pattern starts with a literal and repeats only boundedly,
    so this is linear in its length (tens of milliseconds per MiB).
    """
    data = _as_ascii_bytes(data)
    for kind, pattern in _COMPILED:
        for match in pattern.finditer(data):
            start = match.start()
            if start and data[start - 1] in _TOKEN_CHARS and not kind.endswith("private key"):
                continue  # the tail of a longer word, not a token
            if not _plausible(kind, match.group()):
                continue
            if kind == "a private key":
                head = _KEY_KIND.match(match.group())
                word = head.group(1).split(b" ")[0] if head else b""
                return _KEY_NAMES.get(word, "a private key")
            return kind
    return None


# --- opting back in -------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _allow_spec(globs: tuple[str, ...]) -> GitIgnoreSpec | None:
    return GitIgnoreSpec.from_lines(globs) if globs else None


@dataclass(frozen=True)
class SecretPolicy:
    """The secret rules with a person's exceptions (``allow_secrets``, relative to a root)."""

    allow: tuple[str, ...] = field(default=())

    def allowed(self, relpath: str) -> bool:
        """True when ``relpath`` (POSIX, relative to its root) was opted back in."""
        spec = _allow_spec(self.allow)
        return spec is not None and spec.match_file(relpath)

    def name_verdict(self, abs_path: str, relpath: str) -> str | None:
        """``"<kind> (by name)"`` when the file must be skipped for its name, else None."""
        kind = secret_name(abs_path)
        if kind is None or self.allowed(relpath):
            return None
        return f"file name matches a credential-file rule: {kind}"

    def content_verdict(self, relpath: str, data: bytes) -> str | None:
        """``"contains <kind>"`` when the bytes hold a secret, else None."""
        if self.allow and self.allowed(relpath):
            return None
        kind = secret_content(data)
        return None if kind is None else f"contains {kind}"
