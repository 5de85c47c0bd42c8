# prerm (deb: remove, upgrade NEW-VERSION, deconfigure, failed-upgrade) /
# %preun (rpm: 0 erase, 1 upgrade; on rpm upgrades the old package's %preun runs after the new
# package's %post, so nothing may be undone on 1).
case "$1" in
    remove | 0)
        autoload_remove
        if systemd_running; then
            systemctl stop "$WATCH_UNIT" >/dev/null 2>&1 || true
        fi
        if command -v systemctl >/dev/null 2>&1; then
            systemctl --no-reload disable "$WATCH_UNIT" >/dev/null 2>&1 || true
        fi
        bytecode_remove
        if osquery_installed; then
            echo "egress-agent: removed from $AUTOLOAD; a running osqueryd stops using it at its" \
                "next restart (systemctl restart osqueryd)."
        fi
        ;;
    upgrade)
        bytecode_remove  # the new version's postinst compiles its own
        ;;
esac
exit 0
