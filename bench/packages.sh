#!/usr/bin/env bash
# Cistern as a PyPI and npm cache beside proxpi, devpi-server and Verdaccio:
# the real pip and npm clients install the same generated packages from a
# local "upstream" (nginx serving a static PEP 503 index and its wheels on
# a second host, a static npm registry and its tarballs on a second host),
# through each proxy in turn, with an empty proxy cache (cold) and then
# again with an empty client cache (warm). Loopback only. See
# bench/README.md.
#
# Usage: bench/packages.sh      (PACKAGES=50 WARM_RUNS=3 … to change the knobs)
# Writes the table to $RESULTS_FILE (default bench/last-packages.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

PACKAGES=${PACKAGES:-50}          # projects per ecosystem, all installed at once
VERSIONS=${VERSIONS:-3}           # versions of each project in the index (the latest is installed)
FILE_KIB=${FILE_KIB:-64}          # incompressible bytes in each wheel / tarball
ROUNDS=${ROUNDS:-3}               # rounds: each system in turn, a fresh proxy each
WARM_RUNS=${WARM_RUNS:-3}         # warm installs per system and round
RUN_TIMEOUT=${RUN_TIMEOUT:-300}   # seconds, one client run
LOAD_CPU=${LOAD_CPU:-0}           # pip and npm
SERVER_CPU=${SERVER_CPU:-1}       # the proxy under test and the origin
PYPI_SYSTEMS=${PYPI_SYSTEMS-"direct proxpi devpi cistern"}
NPM_SYSTEMS=${NPM_SYSTEMS-"direct verdaccio cistern"}
# Where the peers are installed (kept between runs: a second run installs
# nothing). proxpi, devpi-server and devpi-client from PyPI into venvs,
# Verdaccio from the npm registry, at these versions.
PEERS_DIR=${PEERS_DIR:-/tmp/cistern-bench-peers}
PROXPI_VERSION=${PROXPI_VERSION:-1.3.1}
GUNICORN_VERSION=${GUNICORN_VERSION:-27.0.1}
DEVPI_SERVER_VERSION=${DEVPI_SERVER_VERSION:-6.20.3}
DEVPI_CLIENT_VERSION=${DEVPI_CLIENT_VERSION:-7.3.0}
VERDACCIO_VERSION=${VERDACCIO_VERSION:-6.8.0}   # 6.10 wants Node 22
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-packages.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

LOG_TAG=packages
. "$HERE/lib.sh"

# --------------------------------------------------------------------------
# Tools: Debian packages, then the peers from their registries.
need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v npm >/dev/null || need_apt+=(npm)
command -v curl >/dev/null || need_apt+=(curl)
command -v taskset >/dev/null || need_apt+=(util-linux)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
apt_install "${need_apt[@]}"
[ "$(nproc)" -ge 2 ] || die "needs two CPUs: one for the clients, one for the servers"

mkdir -p "$PEERS_DIR"
peer_venv() { # dir packages…
    local d="$PEERS_DIR/$1"; shift
    if [ ! -x "$d/bin/python" ] || ! "$d/bin/python" -m pip show -q "${@%%==*}" >/dev/null 2>&1; then
        log "installing ${*} into $d"
        python3 -m venv "$d"
        "$d/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$d.install.log" 2>&1 \
            || { tail -5 "$d.install.log" >&2; return 1; }
    fi
}
declare -A UNAVAILABLE=()
case " $PYPI_SYSTEMS " in *" proxpi "*)
    peer_venv proxpi "proxpi==$PROXPI_VERSION" "gunicorn==$GUNICORN_VERSION" || UNAVAILABLE[proxpi]="pip install proxpi failed (see $PEERS_DIR/proxpi.install.log)";;
esac
case " $PYPI_SYSTEMS " in *" devpi "*)
    peer_venv devpi "devpi-server==$DEVPI_SERVER_VERSION" "devpi-client==$DEVPI_CLIENT_VERSION" || UNAVAILABLE[devpi]="pip install devpi-server failed (see $PEERS_DIR/devpi.install.log)";;
esac
case " $NPM_SYSTEMS " in *" verdaccio "*)
    if [ ! -x "$PEERS_DIR/verdaccio/node_modules/.bin/verdaccio" ]; then
        log "installing verdaccio@$VERDACCIO_VERSION into $PEERS_DIR/verdaccio"
        mkdir -p "$PEERS_DIR/verdaccio"
        npm install --no-audit --no-fund --prefix "$PEERS_DIR/verdaccio" "verdaccio@$VERDACCIO_VERSION" \
            >"$PEERS_DIR/verdaccio.install.log" 2>&1 || UNAVAILABLE[verdaccio]="npm install verdaccio failed (see $PEERS_DIR/verdaccio.install.log)"
    fi;;
esac

CISTERN=${CISTERN_BIN:-}
case " $PYPI_SYSTEMS $NPM_SYSTEMS " in *" cistern "*) RUN_CISTERN=1;; *) RUN_CISTERN=0;; esac
[ "$RUN_CISTERN" = 0 ] || find_cistern
cistern_version() { if [ "$RUN_CISTERN" = 1 ]; then "$CISTERN" --version; else echo "cistern not run"; fi; }

ON_SERVER=(taskset -c "$SERVER_CPU")
ON_LOAD=(taskset -c "$LOAD_CPU")

# --------------------------------------------------------------------------
# Work dir, ports, cleanup
make_workdir

read -r P_PYIDX P_PYFILES P_NPMREG P_NPMFILES P_PROXY < <(free_ports 5)
log "work dir $WORK; upstream :$P_PYIDX (simple index) :$P_PYFILES (wheels) :$P_NPMREG (npm registry) :$P_NPMFILES (tarballs); proxy :$P_PROXY"


# --------------------------------------------------------------------------
# Payloads, made here, offline: $PACKAGES projects of $VERSIONS versions.
# PyPI: a wheel per version (a module and $FILE_KIB KiB of random bytes) with
# its PEP 658 .metadata; a PEP 503 index whose links name the files by
# absolute URL on the file host, with #sha256= and data-dist-info-metadata,
# as pypi.org's do. npm: `npm pack` of a package per version; packuments
# whose dist.tarball names the tarball host, with integrity and shasum.
log "generating $PACKAGES projects x $VERSIONS versions (wheels, npm tarballs)"
python3 - "$WORK" "$PACKAGES" "$VERSIONS" "$FILE_KIB" "$P_PYFILES" <<'EOF'
import base64, hashlib, html, os, random, sys, zipfile
work, n, nv, kib, files_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
idx, files = f"{work}/pypi-index/simple", f"{work}/pypi-files"
os.makedirs(idx, exist_ok=True)
project_links = []
for i in range(1, n + 1):
    name = f"benchpkg-{i:03d}"; mod = name.replace("-", "_")
    links = []
    for v in range(nv):
        version = f"1.0.{v}"
        rng = random.Random(i * 1000 + v)
        dist = f"{mod}-{version}.dist-info"
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Python: >=3.8\n".encode()
        content = {
            f"{mod}/__init__.py": f"VALUE = {i}\nVERSION = {version!r}\n".encode(),
            f"{mod}/data.bin": rng.randbytes(kib << 10),
            f"{dist}/METADATA": metadata,
            f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cistern-bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}" for p, d in content.items()]
        record.append(f"{dist}/RECORD,,")
        content[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
        fname = f"{mod}-{version}-py3-none-any.whl"
        h = hashlib.sha256(fname.encode()).hexdigest()
        rel = f"packages/{h[:2]}/{h[2:4]}/{h[4:]}/{fname}"
        os.makedirs(os.path.dirname(f"{files}/{rel}"), exist_ok=True)
        with zipfile.ZipFile(f"{files}/{rel}", "w", zipfile.ZIP_DEFLATED) as z:
            for p, d in content.items():
                z.writestr(p, d)
        with open(f"{files}/{rel}.metadata", "wb") as f:
            f.write(metadata)
        whl = open(f"{files}/{rel}", "rb").read()
        m = hashlib.sha256(metadata).hexdigest()
        links.append(
            f'<a href="http://127.0.0.1:{files_port}/{rel}#sha256={hashlib.sha256(whl).hexdigest()}" '
            f'data-requires-python="{html.escape(">=3.8")}" data-dist-info-metadata="sha256={m}" '
            f'data-core-metadata="sha256={m}">{fname}</a><br />')
    os.makedirs(f"{idx}/{name}", exist_ok=True)
    with open(f"{idx}/{name}/index.html", "w") as f:
        f.write("<!DOCTYPE html>\n<html>\n<head>\n<meta name=\"pypi:repository-version\" content=\"1.1\">\n"
                f"<title>Links for {name}</title>\n</head>\n<body>\n<h1>Links for {name}</h1>\n"
                + "\n".join(links) + "\n</body>\n</html>\n")
    project_links.append(f'<a href="/simple/{name}/">{name}</a><br />')
with open(f"{idx}/index.html", "w") as f:
    f.write("<!DOCTYPE html>\n<html>\n<head>\n<meta name=\"pypi:repository-version\" content=\"1.1\">\n"
            "<title>Simple index</title>\n</head>\n<body>\n" + "\n".join(project_links) + "\n</body>\n</html>\n")

src = f"{work}/npm-src"
for i in range(1, n + 1):
    for v in range(nv):
        d = f"{src}/benchpkg-{i:03d}-1.0.{v}"
        os.makedirs(d, exist_ok=True)
        open(f"{d}/package.json", "w").write(
            f'{{"name":"benchpkg-{i:03d}","version":"1.0.{v}","main":"index.js","license":"MIT"}}\n')
        open(f"{d}/index.js", "w").write(f"module.exports = {i};\n")
        open(f"{d}/data.bin", "wb").write(random.Random(-(i * 1000 + v)).randbytes(kib << 10))
EOF
mkdir -p "$WORK/npm-tgz" "$WORK/npm-reg" "$WORK/npm-files" "$WORK/npmrc"
: >"$WORK/npmrc/empty"
# npm with no user config, no proxy, no notifier, and its own registry-host
# replacement off (as in tests/index_rewrite.rs), so only the proxy under
# test decides where tarballs come from.
npm_env=(env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u npm_config_registry
    -u npm_config_proxy -u npm_config_https_proxy
    npm_config_userconfig="$WORK/npmrc/empty" npm_config_update_notifier=false
    npm_config_replace_registry_host=never npm_config_audit=false npm_config_fund=false)
(cd "$WORK/npm-src" && "${npm_env[@]}" npm pack ./* --pack-destination "$WORK/npm-tgz" --json \
    --cache "$WORK/npm-pack-cache" >"$WORK/npm-pack.json" 2>"$WORK/npm-pack.log") \
    || die "npm pack failed: $(tail -5 "$WORK/npm-pack.log")"
python3 - "$WORK" "$P_NPMFILES" <<'EOF'
import json, os, shutil, sys
work, port = sys.argv[1], sys.argv[2]
docs = {}
for p in json.load(open(f"{work}/npm-pack.json")):
    name, version = p["name"], p["version"]
    os.makedirs(f"{work}/npm-files/{name}/-", exist_ok=True)
    shutil.move(f"{work}/npm-tgz/{p['filename']}", f"{work}/npm-files/{name}/-/{name}-{version}.tgz")
    doc = docs.setdefault(name, {"_id": name, "name": name, "dist-tags": {}, "versions": {}})
    doc["versions"][version] = {
        "name": name, "version": version, "main": "index.js", "license": "MIT",
        "_id": f"{name}@{version}",
        "dist": {"tarball": f"http://127.0.0.1:{port}/{name}/-/{name}-{version}.tgz",
                 "integrity": p["integrity"], "shasum": p["shasum"]},
    }
    latest = doc["dist-tags"].get("latest")
    if latest is None or tuple(map(int, version.split("."))) > tuple(map(int, latest.split("."))):
        doc["dist-tags"]["latest"] = version
for name, doc in docs.items():
    json.dump(doc, open(f"{work}/npm-reg/{name}", "w"))
EOF
rm -rf "$WORK/npm-src" "$WORK/npm-tgz" "$WORK/npm-pack-cache"
PYPI_BYTES=$(find "$WORK/pypi-files" -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s}')
NPM_BYTES=$(find "$WORK/npm-files" -name '*.tgz' -printf '%s\n' | awk '{s+=$1} END {print s}')
log "wheels: $(find "$WORK/pypi-files" -name '*.whl' | wc -l) ($((PYPI_BYTES >> 10)) KiB); tarballs: $(find "$WORK/npm-files" -name '*.tgz' | wc -l) ($((NPM_BYTES >> 10)) KiB)"

# --------------------------------------------------------------------------
# Cargo: $CRATES crates of $VERSIONS versions in a sparse registry shaped
# like index.crates.io + static.crates.io, each `.crate` made here by
# `cargo package`, offline (as tests/index_rewrite.rs makes its crate).
CRATES=${CRATES:-30}              # crates in the registry, all depended on by one project
SKIP_CARGO=${SKIP_CARGO:-0}       # 1: no cargo part
CARGO_SYSTEMS=${CARGO_SYSTEMS-"direct cistern"}   # there is no cargo caching proxy to compare with
[ "$SKIP_CARGO" != 1 ] || CARGO_SYSTEMS=""
CARGO_CLIENT=${CARGO_CLIENT:-$(rustup which cargo 2>/dev/null || command -v cargo || true)}
# Two more upstream hosts: the sparse index (config.json and its files)
# and the download host its `dl` names.
read -r P_CRIDX P_CRDL < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
mkdir -p "$WORK/crates-index" "$WORK/crates-files/crates"
CRATE_BYTES=0
if [ -n "$CARGO_SYSTEMS" ]; then
    [ -x "$CARGO_CLIENT" ] || die "the cargo part needs cargo (CARGO_CLIENT); SKIP_CARGO=1 leaves it out"
    case " $CARGO_SYSTEMS " in *" cistern "*)
        if [ -z "$CISTERN" ]; then
            CISTERN=${CARGO_TARGET_DIR:-$REPO/target}/release/cistern; RUN_CISTERN=1
        fi
        [ -x "$CISTERN" ] || die "no cistern binary at $CISTERN";;
    esac
    # cargo with its own home: no user config, no proxy, no target dir.
    cargo_env=(env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u all_proxy -u ALL_PROXY
        -u CARGO_TARGET_DIR -u CARGO_REGISTRIES_CRATES_IO_PROTOCOL -u CARGO_BUILD_TARGET_DIR
        -u RUSTC_WRAPPER -u CARGO_HTTP_PROXY CARGO_TERM_COLOR=never)
    log "generating $CRATES crates x $VERSIONS versions (cargo package, offline)"
    python3 - "$WORK" "$CRATES" "$VERSIONS" "$FILE_KIB" <<'EOF'
import os, random, sys
work, n, nv, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for v in range(nv):
    ws = f"{work}/crates-src/v{v}"
    members = [f"benchcrate-{i:03d}" for i in range(1, n + 1)]
    os.makedirs(ws, exist_ok=True)
    open(f"{ws}/Cargo.toml", "w").write(
        "[workspace]\nresolver = \"2\"\nmembers = [" + ", ".join(f'"{m}"' for m in members) + "]\n")
    for i, m in enumerate(members, 1):
        os.makedirs(f"{ws}/{m}/src", exist_ok=True)
        open(f"{ws}/{m}/Cargo.toml", "w").write(
            f'[package]\nname = "{m}"\nversion = "1.0.{v}"\nedition = "2021"\n'
            f'license = "MIT"\ndescription = "cistern bench crate {i}"\n')
        open(f"{ws}/{m}/src/lib.rs", "w").write(
            f'pub const VALUE: u32 = {i};\npub static DATA: &[u8] = include_bytes!("../data.bin");\n')
        open(f"{ws}/{m}/data.bin", "wb").write(random.Random(10**6 + i * 1000 + v).randbytes(kib << 10))
EOF
    for ws in "$WORK"/crates-src/v*; do
        (cd "$ws" && "${cargo_env[@]}" CARGO_HOME="$WORK/cargo-pack-home" "$CARGO_CLIENT" package --workspace \
            --no-verify --allow-dirty --offline >"$ws.log" 2>&1) || die "cargo package failed: $(tail -5 "$ws.log")"
    done
    # The index: config.json naming the download host, as index.crates.io's
    # names static.crates.io; one file per crate at xx/yy/name, a JSON line
    # per version with its cksum (sha256 of the .crate). The download host
    # serves crates/NAME/VERSION/download, the URL cargo makes from `dl`.
    python3 - "$WORK" "$P_CRDL" <<'EOF'
import glob, hashlib, json, os, re, shutil, sys
work, port = sys.argv[1], sys.argv[2]
idx, files = f"{work}/crates-index", f"{work}/crates-files/crates"
json.dump({"dl": f"http://127.0.0.1:{port}/crates"}, open(f"{idx}/config.json", "w"))
lines = {}
for path in sorted(glob.glob(f"{work}/crates-src/v*/target/package/*.crate")):
    name, vers = re.fullmatch(r"(.+)-(\d+\.\d+\.\d+)\.crate", os.path.basename(path)).groups()
    cksum = hashlib.sha256(open(path, "rb").read()).hexdigest()
    os.makedirs(f"{files}/{name}/{vers}", exist_ok=True)
    shutil.move(path, f"{files}/{name}/{vers}/download")
    lines.setdefault(name, []).append((tuple(map(int, vers.split("."))), json.dumps(
        {"name": name, "vers": vers, "deps": [], "cksum": cksum, "features": {}, "yanked": False},
        separators=(",", ":"))))
for name, entries in lines.items():
    d = f"{idx}/{name[:2]}/{name[2:4]}"
    os.makedirs(d, exist_ok=True)
    open(f"{d}/{name}", "w").write("".join(l + "\n" for _, l in sorted(entries)))
EOF
    rm -rf "$WORK/crates-src" "$WORK/cargo-pack-home"
    CRATE_BYTES=$(find "$WORK/crates-files" -name download -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    log "crates: $(find "$WORK/crates-files" -name download | wc -l) ($((CRATE_BYTES >> 10)) KiB); index :$P_CRIDX, downloads :$P_CRDL"
    [ "$(find "$WORK/crates-files" -name download | wc -l)" = $((CRATES * VERSIONS)) ] || die "cargo package made too few crates"
fi

# The upstream: one nginx, one worker, on the server CPU, four hosts (ports)
# with the headers of the real ones: pypi.org's simple pages
# `max-age=600, public`, files.pythonhosted.org's files immutable for a
# year, registry.npmjs.org's packuments `public, max-age=300` and its
# tarballs immutable. nginx adds ETag and Last-Modified.
mkdir -p "$WORK/origin.tmp"
cat >"$WORK/origin.conf" <<EOF
$(nginx_main "$WORK/origin.pid" "$WORK/origin.error.log")
http {
    client_body_temp_path $WORK/origin.tmp/body;
    proxy_temp_path $WORK/origin.tmp/proxy;
    fastcgi_temp_path $WORK/origin.tmp/fastcgi;
    uwsgi_temp_path $WORK/origin.tmp/uwsgi;
    scgi_temp_path $WORK/origin.tmp/scgi;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    log_format counted '\$server_port \$status \$body_bytes_sent \$request_uri';
    access_log $WORK/origin.access.log counted;
    server {
        listen 127.0.0.1:$P_PYIDX;
        root $WORK/pypi-index;
        default_type text/html;
        add_header Cache-Control "max-age=600, public";
    }
    server {
        listen 127.0.0.1:$P_PYFILES;
        root $WORK/pypi-files;
        default_type application/octet-stream;
        add_header Cache-Control "max-age=365000000, immutable, public";
    }
    server {
        listen 127.0.0.1:$P_NPMREG;
        root $WORK/npm-reg;
        default_type application/json;
        add_header Cache-Control "public, max-age=300";
    }
    server {
        listen 127.0.0.1:$P_NPMFILES;
        root $WORK/npm-files;
        default_type application/octet-stream;
        add_header Cache-Control "public, immutable, max-age=31557600";
    }
    # The cargo part's sparse index (index files revalidate after 10 min:
    # a new version appends a line) and its download host (.crate files
    # immutable, as static.crates.io's). start_origin waits on the first
    # four ports only: nginx binds and listens on all of them at once
    # before it accepts anything, so these two listen when those do.
    server {
        listen 127.0.0.1:$P_CRIDX;
        root $WORK/crates-index;
        types { application/json json; }
        default_type text/plain;
        add_header Cache-Control "public, max-age=600";
    }
    server {
        listen 127.0.0.1:$P_CRDL;
        root $WORK/crates-files;
        default_type application/x-tar;
        add_header Cache-Control "public, max-age=31536000, immutable";
    }
}
EOF
start_origin() {
    "${ON_SERVER[@]}" /usr/sbin/nginx -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" &
    ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
    local p
    for p in "$P_PYIDX" "$P_PYFILES" "$P_NPMREG" "$P_NPMFILES"; do wait_port "$p" "$ORIGIN_PID" 60; done
}
start_origin
origin_lines() { wc -l <"$WORK/origin.access.log"; }
# Upstream traffic since line $1 for the index port $2 and the file port $3:
# "index_requests index_bytes file_requests file_200s file_bytes".
origin_since() {
    tail -n +"$(($1 + 1))" "$WORK/origin.access.log" | awk -v i="$2" -v f="$3" '
        $1 == i { ir++; ib += $3 }
        $1 == f { fr++; if ($2 == 200 || $2 == 206) f2++; fb += $3 }
        END { printf "%d %d %d %d %d\n", ir, ib, fr, f2, fb }'
}

# --------------------------------------------------------------------------
# The proxies, each started with an empty cache on the server CPU. Each
# sets PID (the process to measure and stop) and URL (what the client uses).
start_direct_pypi() { PID=; URL="http://127.0.0.1:$P_PYIDX/simple/"; }
start_direct_npm() { PID=; URL="http://127.0.0.1:$P_NPMREG/"; }
start_proxpi() {
    local d="$WORK/proxpi-$ROUND"; mkdir -p "$d/cache"
    # As its Docker image runs it: gunicorn, one process (proxpi's caches
    # are per process), two threads. Index cache TTL at its default (30 min).
    "${ON_SERVER[@]}" env -C "$d" PROXPI_INDEX_URL="http://127.0.0.1:$P_PYIDX/simple/" PROXPI_CACHE_DIR="$d/cache" \
        "$PEERS_DIR/proxpi/bin/gunicorn" --bind "127.0.0.1:$P_PROXY" --threads 2 --no-control-socket proxpi.server:app \
        </dev/null >"$d/stderr.log" 2>&1 &
    PID=$!; PIDS+=("$PID"); URL="http://127.0.0.1:$P_PROXY/index/"
    wait_port "$P_PROXY" "$PID" 60
}
start_devpi() {
    local d="$WORK/devpi-$ROUND"; mkdir -p "$d"
    "$PEERS_DIR/devpi/bin/devpi-init" --serverdir "$d/server" --no-root-pypi >"$d/init.log" 2>&1 \
        || die "devpi-init failed: $(tail -3 "$d/init.log")"
    "${ON_SERVER[@]}" "$PEERS_DIR/devpi/bin/devpi-server" --serverdir "$d/server" --host 127.0.0.1 --port "$P_PROXY" \
        </dev/null >"$d/stderr.log" 2>&1 &
    PID=$!; PIDS+=("$PID")
    wait_port "$P_PROXY" "$PID" 60
    # A mirror index of the local simple index (devpi's own root/pypi names
    # pypi.org), made with devpi-client as its docs do.
    local c=("$PEERS_DIR/devpi/bin/devpi" --clientdir "$d/client")
    { "${c[@]}" use "http://127.0.0.1:$P_PROXY/" &&
      "${c[@]}" login root --password '' &&
      "${c[@]}" index -c root/local type=mirror "mirror_url=http://127.0.0.1:$P_PYIDX/simple/"; } >"$d/client.log" 2>&1 \
        || die "devpi: making the mirror index failed: $(tail -3 "$d/client.log")"
    URL="http://127.0.0.1:$P_PROXY/root/local/+simple/"
}
start_verdaccio() {
    local d="$WORK/verdaccio-$ROUND"; mkdir -p "$d/storage"
    # One uplink, the local registry, with its defaults (cache on, packument
    # maxage 2 min); every package proxied; logs at the default level
    # (one line per request, as Cistern's access log).
    cat >"$d/config.yaml" <<EOF
storage: $d/storage
auth:
  htpasswd:
    file: $d/htpasswd
    max_users: -1
uplinks:
  local:
    url: http://127.0.0.1:$P_NPMREG/
packages:
  '**':
    access: \$all
    publish: \$authenticated
    proxy: local
log: { type: stdout, format: pretty, level: http }
EOF
    "${ON_SERVER[@]}" "$PEERS_DIR/verdaccio/node_modules/.bin/verdaccio" --config "$d/config.yaml" \
        --listen "127.0.0.1:$P_PROXY" </dev/null >"$d/stderr.log" 2>&1 &
    PID=$!; PIDS+=("$PID"); URL="http://127.0.0.1:$P_PROXY/"
    wait_port "$P_PROXY" "$PID" 60
}
start_cistern_pypi() {
    local d="$WORK/cistern-pypi-$ROUND"; mkdir -p "$d"
    # As tests/index_rewrite.rs and docs/policies.md: the index mirror and
    # the file mirror, the pypi policy on both (rewrites the file host's
    # URLs to /pypi-files/, marks files immutable). Access log on.
    cat >"$d/config.kdl" <<EOF
listen "127.0.0.1:$P_PROXY"
store {
    root "$d/replica"
}
policy "pypi" path="builtin:pypi" memory="64MiB" {
    param "files" "http://127.0.0.1:$P_PYFILES/=/pypi-files/"
    body-types "text/html" "application/vnd.pypi.simple.v1+json"
    body-max "8MiB"
}
mirror "pypi" {
    prefix "/pypi/"
    upstream "http://127.0.0.1:$P_PYIDX/"
    policies "pypi"
}
mirror "pypi-files" {
    prefix "/pypi-files/"
    upstream "http://127.0.0.1:$P_PYFILES/"
    policies "pypi"
}
EOF
    "$CISTERN" check "$d/config.kdl" >/dev/null || die "cistern rejected its config"
    "${ON_SERVER[@]}" "$CISTERN" --config "$d/config.kdl" </dev/null 2>>"$d/stderr.log" >/dev/null &
    PID=$!; PIDS+=("$PID"); URL="http://127.0.0.1:$P_PROXY/pypi/simple/"
    wait_port "$P_PROXY" "$PID" 60
}
start_cistern_npm() {
    local d="$WORK/cistern-npm-$ROUND"; mkdir -p "$d"
    cat >"$d/config.kdl" <<EOF
listen "127.0.0.1:$P_PROXY"
store {
    root "$d/replica"
}
policy "npm" path="builtin:npm" memory="64MiB" {
    param "tarballs" "http://127.0.0.1:$P_NPMFILES/=http://127.0.0.1:$P_PROXY/npm-files/"
    body-types "application/json" "application/vnd.npm.install-v1+json"
    body-max "8MiB"
}
mirror "npm" {
    prefix "/npm/"
    upstream "http://127.0.0.1:$P_NPMREG/"
    policies "npm"
}
mirror "npm-files" {
    prefix "/npm-files/"
    upstream "http://127.0.0.1:$P_NPMFILES/"
    policies "npm"
}
EOF
    "$CISTERN" check "$d/config.kdl" >/dev/null || die "cistern rejected its config"
    "${ON_SERVER[@]}" "$CISTERN" --config "$d/config.kdl" </dev/null 2>>"$d/stderr.log" >/dev/null &
    PID=$!; PIDS+=("$PID"); URL="http://127.0.0.1:$P_PROXY/npm/"
    wait_port "$P_PROXY" "$PID" 60
}

# --------------------------------------------------------------------------
# The clients, on the load CPU, each run with a new, empty client cache.
PY_NAMES=(); for i in $(seq "$PACKAGES"); do PY_NAMES+=("$(printf 'benchpkg-%03d' "$i")"); done
LATEST="1.0.$((VERSIONS - 1))"
pip_run() { # url dir: installs every project, prints the seconds it took
    local t0 t1
    mkdir -p "$2"
    t0=$(date +%s.%N)
    timeout "$RUN_TIMEOUT" "${ON_LOAD[@]}" env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
        -u all_proxy -u ALL_PROXY -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
        python3 -m pip install --no-deps --no-compile --only-binary :all: --disable-pip-version-check --no-input \
        --progress-bar off --cache-dir "$2/cache" --index-url "$1" -t "$2/target" "${PY_NAMES[@]}" \
        >"$2/pip.log" 2>&1 || { log "pip failed: $(tail -5 "$2/pip.log")"; echo fail; return 0; }
    t1=$(date +%s.%N)
    # Every project, at its latest version, with the wheel's bytes (pip
    # checked each #sha256 on the way).
    local got
    got=$(find "$2/target" -maxdepth 1 -name "benchpkg_*-$LATEST.dist-info" | wc -l)
    [ "$got" = "$PACKAGES" ] || { log "pip installed $got/$PACKAGES projects at $LATEST"; echo fail; return 0; }
    python3 -c "print(f'{$t1-$t0:.2f}')"
}
npm_run() { # url dir
    local t0 t1 got
    mkdir -p "$2/project"
    echo '{"name":"bench-app","version":"1.0.0","private":true}' >"$2/project/package.json"
    t0=$(date +%s.%N)
    timeout "$RUN_TIMEOUT" "${ON_LOAD[@]}" "${npm_env[@]}" npm install --no-package-lock --no-save \
        --registry "$1" --cache "$2/cache" --prefix "$2/project" "${PY_NAMES[@]}" \
        >"$2/npm.log" 2>&1 || { log "npm failed: $(tail -5 "$2/npm.log")"; echo fail; return 0; }
    t1=$(date +%s.%N)
    got=$(grep -l "\"version\":\"$LATEST\"" "$2"/project/node_modules/benchpkg-*/package.json 2>/dev/null | wc -l)
    [ "$got" = "$PACKAGES" ] || { log "npm installed $got/$PACKAGES packages at $LATEST"; echo fail; return 0; }
    python3 -c "print(f'{$t1-$t0:.2f}')"
}
# cargo: the systems and the client. Cistern as tests/index_rewrite.rs and
# docs/policies.md configure it: the index mirror and the download mirror,
# the cargo policy on both (rewrites config.json's `dl` to /crates-files,
# marks the .crate downloads immutable). Access log on.
start_direct_cargo() { PID=; URL="sparse+http://127.0.0.1:$P_CRIDX/"; }
start_cistern_cargo() {
    local d="$WORK/cistern-cargo-$ROUND"; mkdir -p "$d"
    cat >"$d/config.kdl" <<EOF
listen "127.0.0.1:$P_PROXY"
store {
    root "$d/replica"
}
policy "cargo" path="builtin:cargo" memory="64MiB" {
    param "dl" "http://127.0.0.1:$P_CRDL/crates=http://127.0.0.1:$P_PROXY/crates-files"
    body-types "application/json"
    body-max "1MiB"
}
mirror "crates-index" {
    prefix "/crates-index/"
    upstream "http://127.0.0.1:$P_CRIDX/"
    policies "cargo"
}
mirror "crates-files" {
    prefix "/crates-files/"
    upstream "http://127.0.0.1:$P_CRDL/crates/"
    policies "cargo"
}
EOF
    "$CISTERN" check "$d/config.kdl" >/dev/null || die "cistern rejected its config"
    "${ON_SERVER[@]}" "$CISTERN" --config "$d/config.kdl" </dev/null 2>>"$d/stderr.log" >/dev/null &
    PID=$!; PIDS+=("$PID"); URL="sparse+http://127.0.0.1:$P_PROXY/crates-index/"
    wait_port "$P_PROXY" "$PID"
}
# A project depending on every crate at "1" (the latest, 1.0.$((VERSIONS-1)),
# is resolved); each run copies it without a Cargo.lock into a new dir with
# a new, empty CARGO_HOME whose config replaces crates-io with the registry
# under test. `cargo fetch` resolves (the index) and downloads every .crate.
if [ -n "$CARGO_SYSTEMS" ]; then
    mkdir -p "$WORK/cargo-app/src"
    { printf '[package]\nname = "bench-app"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
      for i in $(seq "$CRATES"); do printf 'benchcrate-%03d = "1"\n' "$i"; done; } >"$WORK/cargo-app/Cargo.toml"
    echo 'fn main() {}' >"$WORK/cargo-app/src/main.rs"
fi
cargo_run() { # url dir
    local t0 t1 got
    mkdir -p "$2/home"
    cp -r "$WORK/cargo-app" "$2/project"
    printf '[source.crates-io]\nreplace-with = "bench"\n\n[source.bench]\nregistry = "%s"\n' "$1" >"$2/home/config.toml"
    t0=$(date +%s.%N)
    timeout "$RUN_TIMEOUT" "${ON_LOAD[@]}" "${cargo_env[@]}" CARGO_HOME="$2/home" "$CARGO_CLIENT" fetch \
        --manifest-path "$2/project/Cargo.toml" >"$2/cargo.log" 2>&1 \
        || { log "cargo failed: $(tail -5 "$2/cargo.log")"; echo fail; return 0; }
    t1=$(date +%s.%N)
    # Every crate at its latest version, stored by cargo after it checked
    # the cksum from the index against the bytes.
    got=$(find "$2/home/registry/cache" -name "benchcrate-*-$LATEST.crate" 2>/dev/null | wc -l)
    [ "$got" = "$CRATES" ] || { log "cargo fetched $got/$CRATES crates at $LATEST"; echo fail; return 0; }
    python3 -c "print(f'{$t1-$t0:.2f}')"
}
median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:] if x!='fail']; print(f'{statistics.median(v):.2f}' if v and len(v)==len(sys.argv)-1 else 'fail')" "$@"; }
# CPU time (user + system) of a process and its descendants, ms.
cpu_ms() { echo $(($(cpu_ticks "$1") * 1000 / TICK)); }
max() { local m=0 v; for v in "$@"; do [ "$v" -gt "$m" ] && m=$v; done; echo "$m"; }

declare -A R
WARNINGS=()
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# One round of one system: a fresh proxy, a cold install, $WARM_RUNS warm
# ones, one with the upstream stopped. Times are appended to lists (the
# medians are taken over all rounds); upstream counts and RSS keep the
# largest of any round.
keep_max() { R[$1]=$(max "${R[$1]:-0}" "$2"); }
bench() { # ecosystem system index-port file-port client round
    local eco=$1 sys=$2 ip=$3 fp=$4 client=$5 round=$6 start k before t times=() i c0 c1
    k="${eco}_${sys}"
    if [ -n "${UNAVAILABLE[$sys]:-}" ]; then log "$sys: skipped: ${UNAVAILABLE[$sys]}"; return; fi
    start=start_$sys; declare -F "$start" >/dev/null || start=start_${sys}_$eco
    ROUND=$round
    log "round $round, $eco/$sys: starting with an empty cache"
    "$start"
    local dir="$WORK/run-$k-$round"
    before=$(origin_lines); [ -z "$PID" ] || c0=$(cpu_ms "$PID")
    t=$("$client" "$URL" "$dir/cold"); R[${k}_cold_all]+=" $t"
    [ -z "$PID" ] || R[${k}_cold_cpu_all]+=" $(( $(cpu_ms "$PID") - c0 ))"
    read -r a _ c d e < <(origin_since "$before" "$ip" "$fp")
    keep_max "${k}_cold_ireq" "$a"; keep_max "${k}_cold_freq" "$c"; keep_max "${k}_cold_fbytes" "$e"
    log "round $round, $eco/$sys: cold $t s; upstream $a index, $c file requests"
    [ -z "$PID" ] || c0=$(cpu_ms "$PID")
    for i in $(seq "$WARM_RUNS"); do
        before=$(origin_lines)
        times+=("$("$client" "$URL" "$dir/warm$i")")
        read -r a b c d e < <(origin_since "$before" "$ip" "$fp")
        keep_max "${k}_warm_ireq" "$a"; keep_max "${k}_warm_ibytes" "$b"; keep_max "${k}_warm_freq" "$c"
        keep_max "${k}_warm_f200" "$d"; keep_max "${k}_warm_fbytes" "$e"
    done
    if [ -n "$PID" ]; then
        c1=$(cpu_ms "$PID")
        R[${k}_warm_cpu_all]+=" $(( (c1 - c0) / WARM_RUNS ))"
    fi
    R[${k}_warm_all]+=" ${times[*]}"
    log "round $round, $eco/$sys: warm ${times[*]} s"
    # Once more with the upstream stopped (nothing listens on its ports):
    # does the warm cache install on its own?
    if [ "$sys" != direct ]; then
        stop "$ORIGIN_PID"
        t=$("$client" "$URL" "$dir/down"); R[${k}_down_all]+=" $t"
        log "round $round, $eco/$sys: with the upstream stopped: $t"
        start_origin
    fi
    [ "$sys" = direct ] || [ "${R[${k}_warm_f200]}" = 0 ] || WARNINGS+=("$eco/$sys round $round: files downloaded from upstream in a warm run")
    for t in ${R[${k}_cold_all]} "${times[@]}" ${R[${k}_down_all]:-}; do [ "$t" != fail ] || { WARNINGS+=("$eco/$sys round $round: a client run failed (see the log)"); break; }; done
    if [ -n "$PID" ]; then
        keep_max "${k}_rss" $(( $(rss_kib "$PID") / 1024 ))
        stop "$PID"
        for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null || break; sleep 0.1; done
        (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null && die "$sys still listens on :$P_PROXY after it was stopped"
    fi
    rm -rf "$dir"
    return 0
}
# One unmeasured run of each client against the upstream first, so the
# first system measured does not pay for loading pip and npm from disk.
log "warming the clients up (not measured)"
[ "$(pip_run "http://127.0.0.1:$P_PYIDX/simple/" "$WORK/client-warmup-pip")" != fail ] || die "pip cannot install from the upstream"
[ "$(npm_run "http://127.0.0.1:$P_NPMREG/" "$WORK/client-warmup-npm")" != fail ] || die "npm cannot install from the upstream"
rm -rf "$WORK/client-warmup-pip" "$WORK/client-warmup-npm"
if [ -n "$CARGO_SYSTEMS" ]; then
    [ "$(cargo_run "sparse+http://127.0.0.1:$P_CRIDX/" "$WORK/client-warmup-cargo")" != fail ] || die "cargo cannot fetch from the upstream"
    rm -rf "$WORK/client-warmup-cargo"
fi

# The systems take turns, round after round, so a swing in the machine's
# load (other builds) falls on all of them rather than on one.
for round in $(seq "$ROUNDS"); do
    for sys in $PYPI_SYSTEMS; do bench pypi "$sys" "$P_PYIDX" "$P_PYFILES" pip_run "$round"; done
    for sys in $NPM_SYSTEMS; do bench npm "$sys" "$P_NPMREG" "$P_NPMFILES" npm_run "$round"; done
    for sys in $CARGO_SYSTEMS; do bench cargo "$sys" "$P_CRIDX" "$P_CRDL" cargo_run "$round"; done
done
for k in "${!R[@]}"; do
    case $k in *_all) read -ra vals <<<"${R[$k]}"; R[${k%_all}]=$(median "${vals[@]}");; esac
done
for k in "${!R[@]}"; do
    case $k in *_cpu) [ "${R[$k]}" = fail ] || R[$k]=$(printf '%.0f' "${R[$k]}");; esac
done

# --------------------------------------------------------------------------
# Report
table() { # ecosystem systems…
    local eco=$1; shift
    local s
    row() { # label key
        local v
        printf '%-46s' "$1"
        for s in $SYS; do v=${R[${eco}_${s}_$2]:--}; [ -n "${UNAVAILABLE[$s]:-}" ] && v="n/a"; printf ' %10s' "$v"; done
        printf '\n'
    }
    SYS="$*"
    printf '%-46s' "$eco: measure"; for s in $SYS; do printf ' %10s' "$s"; done; printf '\n'
    row "cold install, s (median of $ROUNDS)" cold
    row "  proxy CPU, ms" cold_cpu
    row "  upstream index requests" cold_ireq
    row "  upstream file requests" cold_freq
    row "  upstream file bytes" cold_fbytes
    row "warm install, s (median of $((ROUNDS * WARM_RUNS)))" warm
    row "  proxy CPU per install, ms" warm_cpu
    row "  upstream index requests" warm_ireq
    row "  upstream index bytes" warm_ibytes
    row "  upstream file requests" warm_freq
    row "  upstream file downloads (200)" warm_f200
    row "  upstream file bytes" warm_fbytes
    row "upstream stopped: install, s (median of $ROUNDS)" down
    row "RSS after the runs, MiB" rss
}
# The cargo part: its own header lines, the table ("install" is `cargo
# fetch`; index = the sparse index host, file = the download host) and the
# ratios of Cistern to direct.
ratio() { python3 -c "import sys; a,b=sys.argv[1:]; print('-' if 'fail' in (a,b) or '-' in (a,b) or float(b)==0 else f'{float(a)/float(b):.2f}')" "$1" "$2"; }
cargo_report() {
    local ci=${R[cargo_cistern_warm_ireq]:--} cf=${R[cargo_cistern_warm_freq]:--}
    local di=${R[cargo_direct_warm_ireq]:--} df=${R[cargo_direct_warm_freq]:--}
    echo "cargo: $("$CARGO_CLIENT" --version), a project depending on $CRATES crates ($VERSIONS versions each in a sparse index, the latest fetched); $((CRATE_BYTES >> 10)) KiB of .crate files in all; a new CARGO_HOME each run"
    echo "cargo: no peer: there is no caching proxy for cargo registries to put beside Cistern (Panamax syncs a full mirror ahead of time, it does not proxy)"
    table cargo $CARGO_SYSTEMS
    if [[ " $CARGO_SYSTEMS " == *" direct "* && " $CARGO_SYSTEMS " == *" cistern "* ]]; then
        echo "cargo, cistern / direct: cold fetch $(ratio "${R[cargo_cistern_cold]:--}" "${R[cargo_direct_cold]:--}"), warm fetch $(ratio "${R[cargo_cistern_warm]:--}" "${R[cargo_direct_warm]:--}") (wall time); upstream requests per warm fetch $((${ci/-/0} + ${cf/-/0})) against $((${di/-/0} + ${df/-/0}))"
    fi
}
{
    echo "Cistern as a package cache beside proxpi, devpi-server and Verdaccio, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores, $(free -h | awk '/^Mem/ {print $2}') RAM, $(uname -sr)"
    echo "clients on CPU $LOAD_CPU, each proxy and the origin nginx on CPU $SERVER_CPU"
    echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "clients: pip $(python3 -m pip --version | cut -d' ' -f2) (python $(python3 -c 'import platform; print(platform.python_version())')), npm $(npm --version) (node $(node --version))"
    echo "peers: proxpi $PROXPI_VERSION (gunicorn $GUNICORN_VERSION, 2 threads), devpi-server $DEVPI_SERVER_VERSION, verdaccio $VERDACCIO_VERSION; origin $(/usr/sbin/nginx -v 2>&1 | sed 's/.*\///'); $(cistern_version)"
    echo "payload: $PACKAGES projects x $VERSIONS versions, the latest installed; $((PYPI_BYTES >> 10)) KiB of wheels, $((NPM_BYTES >> 10)) KiB of tarballs in all"
    echo "direct = the client against the origin itself, no proxy"
    echo
    table pypi $PYPI_SYSTEMS
    echo
    table npm $NPM_SYSTEMS
    if [ -n "$CARGO_SYSTEMS" ]; then
        echo
        cargo_report
    fi
    for s in "${!UNAVAILABLE[@]}"; do echo "n/a: $s: ${UNAVAILABLE[$s]}"; done
    for w in "${WARNINGS[@]}"; do echo "WARNING: $w"; done
    echo "upstream figures: the largest of any round (of any warm run for warm)"
    echo "every run, s:"
    for k in "${!R[@]}"; do case $k in *_cold_all|*_warm_all|*_down_all) echo "  ${k%_all}:${R[$k]}";; esac; done | sort
} | tee "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
