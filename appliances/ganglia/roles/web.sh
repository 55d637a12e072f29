#!/bin/sh
# Role web: Debian's ganglia-webfrontend (Apache + PHP) at /ganglia/. It reads the gmetad on this
# node through gmetad's interactive port 127.0.0.1:8652 (the front end's default) and the RRDs
# in /var/lib/ganglia/rrds, hence the local dependency and no configuration of its own.
set -eu
gw=/usr/share/ganglia-webfrontend
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

# Named explicitly: without recommends, apt would otherwise pick whichever PHP alternative
# comes first, and php-gd (graphs) is only a recommendation of the front end.
need apache2 libapache2-mod-php php-xml php-gd rrdtool ganglia-webfrontend python3

# Debian 12 and Ubuntu ship ganglia-web 3.7.5, written for PHP 7: under PHP 8 every page dies
# with a fatal error (HTTP 500; upstream ganglia-web issue #384). These are the smallest fixes
# that make the grid, cluster, host and graph pages work. Each sed matches only the unfixed
# text, so a re-run, or a package that fixed it, is left alone; a package upgrade that brings
# the old text back is fixed again by the next contextualization.
# shellcheck disable=SC2016  # the $ are PHP's
sed -i 's/^\(function ganglia_api_error_handler (\$no, \$str, \$file, \$line, \$context\)) {/\1 = null) {/' \
    "$gw/lib/common_api.php"
# shellcheck disable=SC2016
sed -i 's/^\(   global \$conf, \$error, \$parsetime, \$clustername, \$hostname, \$context, \$debug\);$/\1, $SKIP_GMETAD_CONTEXTS;/' \
    "$gw/ganglia.php"
sed -i "s/\$cluster\[LOCALTIME\]/\$cluster['LOCALTIME']/g" "$gw/cluster_view.php"
# shellcheck disable=SC2016
sed -i 's/call_user_func_array(\$funcCompiler, \$params)/call_user_func_array($funcCompiler, array_values($params))/' \
    "$gw/dwoo/Dwoo/Compiler.php"
# The bundled Dwoo template engine still calls each(), removed in PHP 8: provide it to these
# pages only, through PHP's auto_prepend_file, instead of editing ten places in Dwoo.
install -d -m 755 /usr/local/share/crv
cat >/usr/local/share/crv/ganglia-web-php8.php.new <<'PHP'
<?php
// Written by crv (ganglia/web): each() for ganglia-web's bundled Dwoo under PHP 8.
if (!function_exists('each')) {
    function each(array &$array) {
        $key = key($array);
        if ($key === null) {
            return false;
        }
        $value = current($array);
        next($array);
        return array(1 => $value, 'value' => $value, 0 => $key, 'key' => $key);
    }
}
PHP
cat >/etc/apache2/conf-available/crv-ganglia-web-php8.conf.new <<EOF
# Written by crv (ganglia/web).
<Directory "$gw">
    php_value auto_prepend_file /usr/local/share/crv/ganglia-web-php8.php
</Directory>
EOF
reload=0
swap /usr/local/share/crv/ganglia-web-php8.php.new /usr/local/share/crv/ganglia-web-php8.php || true
swap /etc/apache2/conf-available/crv-ganglia-web-php8.conf.new /etc/apache2/conf-available/crv-ganglia-web-php8.conf && reload=1
# The package enables its own snippet (Alias /ganglia) when installed; an administrator may
# have disabled it since.
for conf in ganglia-webfrontend crv-ganglia-web-php8; do
    if [ ! -e "/etc/apache2/conf-enabled/$conf.conf" ]; then
        a2enconf -q "$conf"
        reload=1
    fi
done

systemctl enable apache2
if [ "$reload" = 1 ]; then systemctl reload-or-restart apache2; else systemctl start apache2; fi

# Publish only once PHP renders the page: a 2xx from here is what crv's check will ask for.
python3 <<'PY'
import sys, time, urllib.error, urllib.request
last = None
for _ in range(60):
    try:
        with urllib.request.urlopen("http://127.0.0.1/ganglia/", timeout=5):
            sys.exit(0)
    except (urllib.error.URLError, OSError) as exc:
        last = exc
        time.sleep(1)
sys.exit(f"ganglia web front end not answering: {last}")
PY
crv-agent set url "http://$CRV_ADDRESS/ganglia/"
