#!/usr/bin/env bash
# Install, enable and start repd as a systemd user service, in one command.
#
#   deploy/install-user-service.sh [--dry-run] [--no-sandbox] [--allow-no-roots]
#
# Copies deploy/repd.service to ~/.config/systemd/user/ with ExecStart= pointing at the
# `repd` found on PATH, then daemon-reload, try-restart (a reinstall takes effect) and
# enable --now. `repd service install` does the same from Python, and also writes
# --data-dir, --config, --socket, --model and --device into the unit; use it for those.
set -euo pipefail

readonly UNIT=repd.service
readonly SANDBOX_BEGIN='# >>> sandbox'
readonly SANDBOX_END='# <<< sandbox'
readonly SANDBOX_NOTE='# Commented out by the installer: no usable user namespaces here, or --no-sandbox.'
# The mount-namespace lines of the sandbox block, test-run before installing.
readonly PROBE_PROPS=(ProtectSystem=strict ProtectHome=read-only PrivateTmp=yes
    PrivateMounts=yes PrivateUsers=yes PrivateNetwork=yes ProtectHostname=yes
    ProtectProc=invisible ProcSubset=pid
    ProtectKernelTunables=yes ProtectKernelModules=yes ProtectKernelLogs=yes
    ProtectControlGroups=yes)

usage() {
    cat <<'EOF'
Usage: install-user-service.sh [--dry-run] [--no-sandbox] [--allow-no-roots]

Installs repd as a systemd user service and starts it. The service watches the roots
of ~/.config/repd/config.toml: add them first with `repd roots add PATH...`.

  --dry-run         print what would be done, including the unit file; change nothing
  --no-sandbox      comment out the mount-namespace hardening (otherwise it is test-run
                    with systemd-run and dropped only if this system refuses it)
  --allow-no-roots  install even though no roots are configured (the service exits 2
                    until some are)
  -h, --help        this help

For another data folder, config file, socket, model or device, use
`repd service install --help`: it writes those into the unit.
EOF
}

say() { printf '%s\n' "$*"; }
die() { printf 'install-user-service: error: %s\n' "$*" >&2; exit 1; }

dry_run=0
sandbox=auto
allow_no_roots=0
for arg in "$@"; do
    case $arg in
        --dry-run|-n) dry_run=1 ;;
        --no-sandbox) sandbox=off ;;
        --allow-no-roots) allow_no_roots=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; printf 'install-user-service: error: unknown option: %s\n' "$arg" >&2; exit 2 ;;
    esac
done

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
template=$here/$UNIT
[[ -r $template ]] || die "unit template not found: $template"

repd_bin=$(command -v repd || true)
[[ -n $repd_bin ]] || die "repd is not on PATH: install it first (e.g. pipx install repd) or add its bin folder to PATH"
# A relative PATH entry gives a relative answer; systemd needs an absolute path.
[[ $repd_bin == /* ]] || repd_bin=$(cd -- "$(dirname -- "$repd_bin")" && pwd)/$(basename -- "$repd_bin")
[[ -f $repd_bin && -x $repd_bin ]] || die "$repd_bin is not an executable file"
# systemd refuses program paths holding quotes, backslashes or control characters.
if [[ $repd_bin =~ [\"\'\\[:cntrl:]] ]]; then
    die "systemd cannot run a program whose path contains quotes, backslashes or control characters: $repd_bin; install repd elsewhere"
fi

config_home=${XDG_CONFIG_HOME:-}
# The XDG spec says relative values are invalid and must be ignored.
[[ $config_home == /* ]] || config_home=$HOME/.config
unit_dir=$config_home/systemd/user
unit_path=$unit_dir/$UNIT
data_dir=$HOME/.local/share/repd

# The first word of ExecStart=: %specifiers are expanded in the whole line ($VARIABLES
# only in the arguments, not in the program's path), and whitespace needs quotes.
escape_exec_path() {
    local s=${1//%/%%}
    if [[ $s == *" "* ]]; then
        s=\"$s\"
    fi
    printf '%s' "$s"
}

# The unit to install (same output as repd.adapters.systemd_unit.render_user_unit).
render_unit() {
    local keep=$1 line in_sandbox=0 exec_lines=0 exec_path
    exec_path=$(escape_exec_path "$repd_bin")
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == ExecStart=* ]]; then
            line="ExecStart=$exec_path run"
            exec_lines=$((exec_lines + 1))
        elif [[ $line == "$SANDBOX_BEGIN" ]]; then
            in_sandbox=1
            if [[ $keep == 0 ]]; then
                printf '%s\n%s\n' "$line" "$SANDBOX_NOTE"
                continue
            fi
        elif [[ $line == "$SANDBOX_END" ]]; then
            in_sandbox=0
        elif [[ $in_sandbox == 1 && $keep == 0 && -n $line && $line != \#* ]]; then
            line="#$line"
        fi
        printf '%s\n' "$line"
    done <"$template"
    [[ $exec_lines == 1 ]] || die "unit template has $exec_lines ExecStart= lines, expected 1"
}

probe_sandbox() {
    local args=() prop
    for prop in "${PROBE_PROPS[@]}"; do args+=(-p "$prop"); done
    systemd-run --user --wait --quiet --collect "${args[@]}" /bin/true >/dev/null 2>&1
}

# The service reads its folders from the config file; with none it exits 2 at once, and
# systemd does not restart a service that exits 2.
if [[ -n ${REPD_CONFIG:-} ]]; then
    say "warning: REPD_CONFIG is set here but the service will not see it: use \`repd service install\`, which writes it into the unit" >&2
fi
if [[ $allow_no_roots == 0 ]]; then
    roots_json=$(env -u REPD_CONFIG -u REPD_ROOTS "$repd_bin" roots list --json --timeout 1 2>&1) ||
        die "cannot read the configured roots: $roots_json"
    if [[ $roots_json != *'"path":'* ]]; then
        printf 'install-user-service: error: %s\n' "no roots configured: the service would exit 2 at once and never restart; add folders with \`repd roots add PATH...\` first (or pass --allow-no-roots)" >&2
        exit 2
    fi
fi

steps=("daemon-reload" "try-restart $UNIT" "enable --now $UNIT")

if [[ $dry_run == 1 ]]; then
    say "dry run: nothing is changed"
    say "repd:      $repd_bin"
    say "unit file: $unit_path"
    keep=1
    if [[ $sandbox == off ]]; then
        keep=0
    else
        say "would test-run the sandbox with systemd-run (shown kept below)"
    fi
    say "would write $unit_path:"
    unit_text=$(render_unit "$keep")
    say "$unit_text"
    say "would create $data_dir"
    for step in "${steps[@]}"; do say "would run: systemctl --user $step"; done
    exit 0
fi

command -v systemctl >/dev/null || die "systemctl not found: this needs systemd"
systemctl --user show-environment >/dev/null 2>&1 ||
    die "no systemd user manager is reachable: log in normally (not via su or sudo), or export XDG_RUNTIME_DIR=/run/user/$(id -u) and try again"

say "repd:      $repd_bin"
say "unit file: $unit_path"
keep=1
if [[ $sandbox == off ]]; then
    keep=0
    say "sandbox: commented out as asked"
elif ! probe_sandbox; then
    keep=0
    say "sandbox: this system refused a test run of the mount-namespace lines (user namespaces unavailable); installed with that block commented out"
fi

# Render fully before touching the installed unit, then swap it in atomically.
unit_text=$(render_unit "$keep")
mkdir -p -- "$unit_dir" "$data_dir"
printf '%s\n' "$unit_text" >"$unit_path.tmp"
mv -f -- "$unit_path.tmp" "$unit_path"
say "wrote $unit_path"

for step in "${steps[@]}"; do
    # shellcheck disable=SC2086  # each step is a fixed, space-separated argument list
    systemctl --user $step ||
        die "'systemctl --user $step' failed; see: systemctl --user status repd; journalctl --user -u repd"
    say "ran: systemctl --user $step"
done
say "repd is running: systemctl --user status repd | journalctl --user -u repd -f"
if command -v loginctl >/dev/null &&
    [[ $(loginctl show-user "$(id -un)" -p Linger --value 2>/dev/null || true) == no ]]; then
    say "note: it stops when you log out; to keep it running: loginctl enable-linger $(id -un)"
fi
