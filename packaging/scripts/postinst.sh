# postinst (deb: configure OLD-VERSION) / %post (rpm: 1 install, 2 upgrade).
case "$1" in
    configure | 1 | 2) ;;
    *) exit 0 ;;  # abort-upgrade, abort-remove, ...: nothing was undone that needs redoing
esac

bytecode_compile
autoload_add

if systemd_running; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    # An upgrade restarts the standalone watcher if the administrator runs it; it is never enabled
    # or started by the package itself.
    systemctl try-restart "$WATCH_UNIT" >/dev/null 2>&1 || true
fi

if grep -Eq "$ACTIVE_LINE" "$AUTOLOAD" 2>/dev/null; then
    if osquery_installed; then
        echo "egress-agent: $EXTENSION is in $AUTOLOAD; osqueryd loads it at its next restart" \
            "(systemctl restart osqueryd)."
    else
        echo "egress-agent: $EXTENSION is in $AUTOLOAD; osqueryd will load it once osquery is" \
            "installed. The egress-agent command works without it."
    fi
else
    echo "egress-agent: $EXTENSION is commented out in $AUTOLOAD; left as it is."
fi
exit 0
