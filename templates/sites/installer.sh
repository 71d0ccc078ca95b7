{% autoescape off %}#!/bin/sh
# Edgewise edge runtime installer for site {{ site_label }}.
#
# Run it on a Linux machine at that site that has Python 3.11 or newer:
#     sh {{ script_name }} [--onnxruntime cpu|gpu|openvino|directml|auto]
# As root on a machine with systemd it installs and starts the service
# edgewise-node; otherwise it installs into your home directory (or
# EDGEWISE_PREFIX) and prints the command that starts the node.
#
# This file carries an enrollment token for this one site. The token is
# single-purpose: it only enrolls nodes at this site ({{ token_uses }}), and it
# expires{{ token_expiry }}. Until then anyone holding this file can enroll
# a node here, so keep it out of shared places and delete it once done.
#
# --onnxruntime chooses the onnxruntime build the node runs its models on
# (EDGEWISE_ONNXRUNTIME does the same): cpu (the stock build), gpu (NVIDIA,
# CUDA and TensorRT), openvino (Intel CPUs, GPUs and NPUs), directml (Windows
# only). auto, the default, keeps the variant an earlier run installed, and
# on a first install picks gpu when `nvidia-smi -L` lists a GPU, else cpu.
# The variants install the same files, so one is never put over another: the
# one installed before is removed first.
#
# Settings (environment variables, all optional):
#   EDGEWISE_ONNXRUNTIME  the onnxruntime variant, as --onnxruntime (default: auto)
#   EDGEWISE_PYTHON       Python 3.11+ interpreter to use (default: python3)
#   EDGEWISE_PREFIX       where the runtime is installed (default: /opt/edgewise
#                         as root, else ~/.local/share/edgewise-runtime)
#   EDGEWISE_STATE_DIR    the node's state (default: /var/lib/edgewise as root,
#                         else ~/.local/share/edgewise)
#   EDGEWISE_NODE_NAME    the node's name (default: the host name)
#   EDGEWISE_NODE_ROLE    device, gateway or server (default: device)
#   EDGEWISE_OFFLINE=1    install everything from the control plane, no package index
#   EDGEWISE_PIP_ARGS     extra arguments for pip (a proxy, an internal index)
#   EDGEWISE_START=1      without systemd: start the node in the background
#   EDGEWISE_SYSTEMD=0    never install a systemd service (containers, tests)
#
# Safe to run again: an enrolled node is not enrolled twice, and an upgrade
# keeps the onnxruntime variant installed unless --onnxruntime names another.
set -eu

CONTROL_PLANE_URL={{ url }}
ENROLLMENT_TOKEN={{ token }}
SIGNING_KEY_FINGERPRINT={{ fingerprint }}
SITE={{ site_slug }}
RUNTIME_VERSION={{ version }}
RUNTIME_WHEEL={{ wheel_filename }}
RUNTIME_SHA256={{ wheel_sha256 }}
DIST_URL="$CONTROL_PLANE_URL/agent/v1/dist/"

say() { printf 'edgewise: %s\n' "$*"; }
die() { printf 'edgewise: error: %s\n' "$*" >&2; exit 1; }
VARIANTS="cpu, gpu, openvino, directml or auto"

onnxruntime=${EDGEWISE_ONNXRUNTIME:-auto}
while [ $# -gt 0 ]; do
    case $1 in
        --onnxruntime)
            [ $# -ge 2 ] || die "--onnxruntime needs a value: $VARIANTS"
            onnxruntime=$2
            shift 2 ;;
        --onnxruntime=*) onnxruntime=${1#--onnxruntime=}; shift ;;
        -h|--help)
            echo "usage: sh $0 [--onnxruntime cpu|gpu|openvino|directml|auto]"
            echo "(the settings are described at the top of this file)"
            exit 0 ;;
        *) die "unknown option '$1' (usage: sh $0 [--onnxruntime cpu|gpu|openvino|directml|auto])" ;;
    esac
done
case $onnxruntime in
    cpu|gpu|openvino|directml|auto) ;;
    *) die "--onnxruntime $onnxruntime is not an onnxruntime variant (use $VARIANTS)" ;;
esac

[ "$(uname -s)" = Linux ] || die "this installer is for Linux; this machine runs $(uname -s)"

if [ "$(id -u)" = 0 ]; then is_root=1; else is_root=0; fi
if [ "$is_root" = 1 ]; then
    prefix=${EDGEWISE_PREFIX:-/opt/edgewise}
    state_dir=${EDGEWISE_STATE_DIR:-/var/lib/edgewise}
else
    prefix=${EDGEWISE_PREFIX:-$HOME/.local/share/edgewise-runtime}
    state_dir=${EDGEWISE_STATE_DIR:-$HOME/.local/share/edgewise}
fi
node_name=${EDGEWISE_NODE_NAME:-$(hostname 2>/dev/null || uname -n)}
node_role=${EDGEWISE_NODE_ROLE:-device}
case "$node_role" in
    device|gateway|server) ;;
    *) die "EDGEWISE_NODE_ROLE=$node_role is not a node role (use device, gateway or server)" ;;
esac

# -- Python 3.11+ ------------------------------------------------------------
version_ok='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
if [ -n "${EDGEWISE_PYTHON:-}" ]; then
    python=$EDGEWISE_PYTHON
    command -v "$python" >/dev/null 2>&1 || die "EDGEWISE_PYTHON=$python is not an executable"
else
    python=$(command -v python3 2>/dev/null) || \
        die "python3 was not found; install Python 3.11 or newer, or set EDGEWISE_PYTHON to one"
fi
if ! "$python" -c "$version_ok" 2>/dev/null; then
    found=$("$python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))' 2>/dev/null || echo unknown)
    die "$python is Python $found; the edge runtime needs Python 3.11 or newer (install one, or set EDGEWISE_PYTHON)"
fi
"$python" -c 'import venv, ensurepip' 2>/dev/null || \
    die "$python cannot create virtual environments; install its venv module (Debian/Ubuntu: apt-get install python3-venv)"

# -- onnxruntime: which variant -----------------------------------------------
# One extra of edge-runtime per variant; each installs one distribution.
dist_of() {
    case $1 in
        cpu) echo onnxruntime ;;
        gpu) echo onnxruntime-gpu ;;
        openvino) echo onnxruntime-openvino ;;
        directml) echo onnxruntime-directml ;;
    esac
}
variant_of() {
    case $1 in
        onnxruntime) echo cpu ;;
        onnxruntime-gpu) echo gpu ;;
        onnxruntime-openvino) echo openvino ;;
        onnxruntime-directml) echo directml ;;
    esac
}
# The distributions that provide the onnxruntime package in $prefix (normalized names, sorted), read from
# their metadata as pip does; -I: nothing in this folder or the environment can stand in for them.
installed_onnxruntime() {
    [ -x "$prefix/bin/python" ] || return 0
    "$prefix/bin/python" -I -c 'import importlib.metadata as m, re
found = m.packages_distributions().get("onnxruntime", [])
print(" ".join(sorted({re.sub(r"[-_.]+", "-", d).lower() for d in found})))' 2>/dev/null || true
}
gpu_listed() {
    command -v nvidia-smi >/dev/null 2>&1 || return 1
    # nvidia-smi can hang on a wedged driver: ten seconds, where timeout(1) exists.
    if command -v timeout >/dev/null 2>&1; then
        timeout 10 nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'
    else
        nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'
    fi
}

have=$(installed_onnxruntime)
if [ "$onnxruntime" = auto ] && [ -n "$have" ]; then
    # An upgrade keeps what is there. Of several (stock onnxruntime put over a variant by an older
    # runtime, which required it), the variant other than stock is the one someone chose.
    keep=onnxruntime
    for dist in $have; do
        if [ "$dist" != onnxruntime ]; then keep=$dist; break; fi
    done
    variant=$(variant_of "$keep")
    if [ -z "$variant" ] && [ "$have" != "$keep" ]; then
        die "$prefix has several onnxruntime builds installed over each other ($have), one of them ($keep) not an edge-runtime variant; uninstall all of them ($prefix/bin/python -m pip uninstall -y $have) and run this again with --onnxruntime"
    fi
    if [ -n "$variant" ]; then
        say "keeping the onnxruntime variant installed: $variant ($keep)"
    else
        say "keeping $keep, an onnxruntime build edge-runtime has no extra for"
    fi
elif [ "$onnxruntime" = auto ]; then
    if gpu_listed; then
        variant=gpu
        say "onnxruntime variant: gpu (nvidia-smi lists a GPU; choose another with --onnxruntime)"
    else
        variant=cpu
        say "onnxruntime variant: cpu (no GPU listed by nvidia-smi; choose another with --onnxruntime)"
    fi
else
    variant=$onnxruntime
    say "onnxruntime variant: $variant (as asked)"
fi
want=$(dist_of "$variant")
# What else provides onnxruntime goes first: installed over each other, the variants overwrite each
# other's files, and uninstalling one afterwards would take shared files from the other.
remove=
if [ -n "$want" ] && [ -n "$have" ] && [ "$have" != "$want" ]; then
    remove=$have
fi

# -- the runtime -------------------------------------------------------------
if [ ! -x "$prefix/bin/python" ]; then
    say "creating a Python environment in $prefix"
    "$python" -m venv "$prefix" || die "could not create a virtual environment in $prefix"
fi

if [ -n "$remove" ]; then
    say "removing $remove before installing $want: onnxruntime builds must not be installed over each other"
    # shellcheck disable=SC2086  # the names, one word each
    "$prefix/bin/python" -m pip uninstall --disable-pip-version-check --no-input -y $remove || \
        die "pip could not uninstall $remove (see pip's message above)"
fi

extra=${variant:+[$variant]}
if [ "${EDGEWISE_OFFLINE:-0}" = 1 ]; then
    index_args=--no-index
    say "installing edge-runtime$extra $RUNTIME_VERSION and its dependencies from $DIST_URL only"
else
    index_args=
    say "installing edge-runtime$extra $RUNTIME_VERSION from $DIST_URL"
fi
# The runtime itself comes from this control plane and nowhere else, checked
# against the sha256 the console computed; dependencies come from the control
# plane's wheelhouse or, unless offline, the package index.
# EDGEWISE_PIP_ARGS and index_args are split into words on purpose; no globbing.
set -f
# shellcheck disable=SC2086
"$prefix/bin/python" -m pip install --disable-pip-version-check --no-input \
    --find-links "$DIST_URL" $index_args ${EDGEWISE_PIP_ARGS:-} \
    "edge-runtime$extra @ $DIST_URL$RUNTIME_WHEEL#sha256=$RUNTIME_SHA256" || \
    die "pip could not install edge-runtime$extra $RUNTIME_VERSION from $DIST_URL (see pip's message above; offline, the control plane's wheelhouse needs ${want:-the} wheels for this machine)"
set +f
runtime="$prefix/bin/edge-runtime"
[ -x "$runtime" ] || die "the installation did not provide $runtime"

# -- checks ------------------------------------------------------------------
now=$(installed_onnxruntime)
if [ -n "$want" ] && [ "$now" != "$want" ]; then
    die "after the install onnxruntime in $prefix comes from '${now:-nothing}', not $want alone"
fi
found=$("$prefix/bin/python" -I -c 'import onnxruntime as o
print(o.__version__, "with", ", ".join(o.get_available_providers()))') || \
    die "onnxruntime ($now) is installed in $prefix but does not load (see the message above)"
say "onnxruntime: $now $found"
problems=$("$prefix/bin/python" -m pip check --disable-pip-version-check 2>&1) || \
    die "pip check reports problems in $prefix:
$problems"
say "pip check: $problems"

# -- enrollment --------------------------------------------------------------
if [ -f "$state_dir/identity.json" ]; then
    say "this node is already enrolled (state in $state_dir); not enrolling it again"
else
    # `edge-runtime enroll --fingerprint` first has the control plane prove it
    # holds the signing key this installer was issued with, and only then
    # lets the one-time token leave this machine.
    # The token goes in on stdin, never as an argument: every local user can
    # read a command line (ps, /proc/<pid>/cmdline). printf is the shell's
    # builtin, so no process is started with the token in its arguments, and
    # the variable is not exported, so no process has it in its environment.
    # One inherited from the environment would be a second token (refused).
    unset EDGEWISE_ENROLLMENT_TOKEN
    say "enrolling node $node_name ($node_role) at site $SITE"
    printf '%s\n' "$ENROLLMENT_TOKEN" | "$runtime" enroll --url "$CONTROL_PLANE_URL" --token-stdin \
        --fingerprint "$SIGNING_KEY_FINGERPRINT" --name "$node_name" --role "$node_role" \
        --state-dir "$state_dir" || die "enrollment failed (see the message above); nothing was started"
fi

# -- running it --------------------------------------------------------------
if [ "$is_root" = 1 ] && [ -d /run/systemd/system ] && [ "${EDGEWISE_SYSTEMD:-1}" != 0 ]; then
    unit=/etc/systemd/system/edgewise-node.service
    cat > "$unit" <<UNIT
[Unit]
Description=Edgewise edge runtime (site $SITE)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart="$runtime" run --state-dir "$state_dir"
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable edgewise-node.service
    # restart, not start: a re-run after an upgrade must load the new code.
    systemctl restart edgewise-node.service
    say "started edgewise-node.service (systemctl status edgewise-node)"
elif [ "${EDGEWISE_START:-0}" = 1 ]; then
    pid_file="$state_dir/edge-runtime.pid"
    log_file="$state_dir/edge-runtime.log"
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        say "the node is already running (pid $(cat "$pid_file")); not starting another"
    else
        nohup "$runtime" run --state-dir "$state_dir" >>"$log_file" 2>&1 </dev/null &
        echo $! > "$pid_file"
        say "started the node in the background: pid $(cat "$pid_file"), log $log_file"
    fi
else
    say "installed. Start the node with:"
    printf "    '%s' run --state-dir '%s'\n" "$runtime" "$state_dir"
fi
{% endautoescape %}