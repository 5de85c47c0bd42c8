# Shared by every egress-agent package scriptlet; packaging/build puts it at the top of each one.
# The scriptlets serve both formats: Debian passes a word (configure, remove, purge, upgrade, ...),
# rpm the number of instances of the package there will be (%post: 1 install, 2 upgrade; %preun and
# %postun: 0 erase, 1 upgrade). They use only POSIX sh, grep, sed, find and coreutils.

umask 022
EXTENSION=/opt/egress-agent/bin/egress-agent.ext
AUTOLOAD=/etc/osquery/extensions.load
# osqueryd reads one path a line; '#' and ';' start comments; it trims surrounding blanks.
ACTIVE_LINE='^[[:space:]]*/opt/egress-agent/bin/egress-agent\.ext[[:space:]]*$'
DISABLED_LINE='^[[:space:]]*[#;][[:space:]]*/opt/egress-agent/bin/egress-agent\.ext[[:space:]]*$'

# Add the extension to osqueryd's autoload list, once. extensions.load belongs to no package (the
# administrator and other extensions share it): only our line is written, every other line stays as
# it is. A line the administrator commented out means "do not load it" and is respected.
autoload_add() {
    if [ -f "$AUTOLOAD" ] && grep -Eq "$ACTIVE_LINE|$DISABLED_LINE" "$AUTOLOAD"; then
        return 0
    fi
    mkdir -p "$(dirname "$AUTOLOAD")"
    if [ -s "$AUTOLOAD" ] && [ -n "$(tail -c 1 "$AUTOLOAD")" ]; then
        printf '\n' >>"$AUTOLOAD"  # the last line had no newline of its own
    fi
    printf '%s\n' "$EXTENSION" >>"$AUTOLOAD"
}

# Drop our line(s) matching the given pattern from the autoload list, keeping every other line as it
# was. The file is rewritten in place, so its owner, mode and security context stay; a list left
# empty is deleted (osqueryd treats a missing list as an empty one).
autoload_drop() {
    [ -f "$AUTOLOAD" ] || return 0
    grep -Eq "$1" "$AUTOLOAD" || return 0
    kept=$(mktemp)
    grep -Ev "$1" "$AUTOLOAD" >"$kept" || true
    if [ -s "$kept" ]; then
        cat "$kept" >"$AUTOLOAD"
    else
        rm -f "$AUTOLOAD"
        rmdir "$(dirname "$AUTOLOAD")" 2>/dev/null || true
    fi
    rm -f "$kept"
}

autoload_remove() { autoload_drop "$ACTIVE_LINE"; }
autoload_forget() { autoload_drop "$ACTIVE_LINE|$DISABLED_LINE"; }

osquery_installed() {
    [ -x /opt/osquery/bin/osqueryd ] || command -v osqueryd >/dev/null 2>&1
}

systemd_running() { [ -d /run/systemd/system ]; }

# Python writes bytecode beside the sources when it runs as root; compile it now (so that users who
# cannot write there start fast too) with the interpreter the launchers use, and remove it before
# the package's files go, so that no directory of ours is left behind. A host without Python 3.8+
# (RHEL 8 with only its 3.6) hears at install time which package to install.
bytecode_compile() {
    if missing=$(/opt/egress-agent/libexec/python -c '' 2>&1); then
        /opt/egress-agent/libexec/python -m compileall -q -j 0 /opt/egress-agent/lib >/dev/null 2>&1 || true
    else
        echo "$missing" >&2
    fi
}
bytecode_remove() {
    if [ -d /opt/egress-agent ]; then
        find /opt/egress-agent -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
    fi
}

WATCH_UNIT=egress-agent-watch.service
