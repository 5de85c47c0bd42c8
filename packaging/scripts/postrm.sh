# postrm (deb: remove, purge, upgrade, disappear, abort-*) / %postun (rpm: 0 erase, 1 upgrade).
case "$1" in
    remove)
        if systemd_running; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
        ;;
    purge)
        # dpkg has removed the conffile; this takes the rest of the configuration (dpkg's backups,
        # files the administrator added), the history store, and a commented-out autoload line.
        rm -rf /etc/egress-agent /var/lib/egress-agent
        autoload_forget
        ;;
    0)
        # rpm has no purge: an erase is final. rpm itself keeps an edited config.yaml as
        # config.yaml.rpmsave; the history store is derived data and goes.
        rm -rf /var/lib/egress-agent
        autoload_forget
        if systemd_running; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
        ;;
esac
exit 0
