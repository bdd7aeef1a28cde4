#!/usr/bin/env bash
# Builds, from Go modules, the Kubernetes control-plane programs the tests run as local processes:
#   etcd, kube-apiserver, kube-controller-manager, kubectl (pinned in hack/k8s/{etcd,kubernetes}/go.mod)
#   and helm v3 (hack/k8s/helm/go.mod).
# Only what is missing (or was built from another pinned version) is built; when everything is there
# it does nothing. The last line on stdout is the asset directory, so a Makefile can do
#   export KUBEBUILDER_ASSETS := $(shell hack/k8s/ensure-binaries.sh | tail -n 1)
#
# Asset directory, first that is set:
#   $KUBEBUILDER_ASSETS                      (as controller-runtime's envtest; binaries already there are used as they are)
#   $ISDR_K8S_ASSETS
#   $HOME/.cache/isdr/k8s-assets/<kubernetes version>
#
# Usage: hack/k8s/ensure-binaries.sh [--print-dir] [--check] [--force]
#   --print-dir  only print the asset directory
#   --check      build nothing; exit 1 (and name them) if some binaries are missing
#   --force      rebuild all five
# Needs Go >= 1.24 (GO=/path/to/go to choose one) and the Go module proxy. A cold build (empty Go
# module and build caches) took 6.4 minutes on 2 cores; see docs/development-kubernetes.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

print_dir_only=0
check_only=0
force=0
for arg in "$@"; do
    case "$arg" in
        --print-dir) print_dir_only=1 ;;
        --check) check_only=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "ensure-binaries: unknown argument $arg" >&2; exit 2 ;;
    esac
done

# The version a go.mod requires a module at (the pins are the single source of truth).
module_version() {
    awk -v m="$2" '{ for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v[0-9]/ && $(i - 1) != "=>") { print $(i + 1); exit } }' \
        "$HERE/$1/go.mod"
}

K8S_VERSION=$(module_version kubernetes k8s.io/kubernetes)
ETCD_VERSION=$(module_version etcd go.etcd.io/etcd/server/v3)
HELM_VERSION=$(module_version helm helm.sh/helm/v3)
if [ -z "$K8S_VERSION" ] || [ -z "$ETCD_VERSION" ] || [ -z "$HELM_VERSION" ]; then
    echo "ensure-binaries: cannot read the pinned versions from $HERE/*/go.mod" >&2
    exit 1
fi

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    ASSETS=$KUBEBUILDER_ASSETS
elif [ -n "${ISDR_K8S_ASSETS:-}" ]; then
    ASSETS=$ISDR_K8S_ASSETS
else
    ASSETS=${HOME:-/root}/.cache/isdr/k8s-assets/$K8S_VERSION
fi

if [ "$print_dir_only" = 1 ]; then
    echo "$ASSETS"
    exit 0
fi

# name -> the version it is built from. A binary with a stamp file (.NAME.version) from another
# version is rebuilt; one without a stamp (e.g. put there by setup-envtest) is used as it is.
declare -A WANT=(
    [etcd]="etcd $ETCD_VERSION"
    [kube-apiserver]="kubernetes $K8S_VERSION"
    [kube-controller-manager]="kubernetes $K8S_VERSION"
    [kubectl]="kubernetes $K8S_VERSION"
    [helm]="helm $HELM_VERSION"
)
ALL=(etcd kube-apiserver kube-controller-manager kubectl helm)

is_present() {
    local name=$1
    [ "$force" = 0 ] || return 1
    [ -x "$ASSETS/$name" ] || return 1
    if [ -f "$ASSETS/.$name.version" ]; then
        [ "$(cat "$ASSETS/.$name.version")" = "${WANT[$name]}" ] || return 1
    fi
    return 0
}

missing_list() {
    local name
    for name in "${ALL[@]}"; do
        is_present "$name" || echo "$name"
    done
}

missing_now=$(missing_list)
if [ -z "$missing_now" ]; then
    echo "$ASSETS"
    exit 0
fi
if [ "$check_only" = 1 ]; then
    echo "ensure-binaries: missing in $ASSETS: ${missing_now//$'\n'/ }" >&2
    exit 1
fi

mkdir -p "$ASSETS"
# One build at a time per asset directory (two test runs starting together on a fresh machine).
exec 9>"$ASSETS/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

GO=${GO:-$(command -v go || true)}
if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then
    GO=/usr/local/go/bin/go
fi
if [ -z "$GO" ]; then
    echo "ensure-binaries: Go (>= 1.24) is needed to build the Kubernetes test binaries: install it or set GO=" >&2
    exit 1
fi
go_minor=$("$GO" env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if ! [ "$go_minor" -ge 24 ] 2>/dev/null; then
    echo "ensure-binaries: $("$GO" env GOVERSION) is too old; Kubernetes $K8S_VERSION needs Go >= 1.24" >&2
    exit 1
fi

export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"
JOBS=${ISDR_K8S_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}

# Build PACKAGES (from module dir MODDIR) into a temporary folder, then move the binaries in,
# so that an interrupted build never leaves a half-written binary behind.
build() {
    local moddir=$1 ldflags=$2
    shift 2
    local tmp
    tmp=$(mktemp -d "$ASSETS/.build.XXXXXX")
    local names=()
    local pkg
    for pkg in "$@"; do names+=("$(basename "$pkg")"); done
    echo "ensure-binaries: building ${names[*]} ($("$GO" env GOVERSION), -p $JOBS) into $ASSETS ..." >&2
    local start=$SECONDS
    if ! (cd "$HERE/$moddir" && "$GO" build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$tmp/" "$@") >&2; then
        rm -rf "$tmp"
        echo "ensure-binaries: building ${names[*]} failed" >&2
        exit 1
    fi
    local name
    for name in "${names[@]}"; do
        mv -f "$tmp/$name" "$ASSETS/$name"
        echo "${WANT[$name]}" > "$ASSETS/.$name.version"
    done
    rm -rf "$tmp"
    echo "ensure-binaries: built ${names[*]} in $((SECONDS - start))s" >&2
}

needs() { ! is_present "$1"; }

k8s_pkgs=()
for name in kube-apiserver kube-controller-manager kubectl; do
    if needs "$name"; then k8s_pkgs+=("k8s.io/kubernetes/cmd/$name"); fi
done
if [ "${#k8s_pkgs[@]}" -gt 0 ]; then
    minor=$(echo "$K8S_VERSION" | cut -d. -f2)
    ld="-s -w"
    # kubectl, the API server's /version and so helm's kubeVersion checks read these.
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    done
    build kubernetes "$ld" "${k8s_pkgs[@]}"
fi

if needs etcd; then
    build etcd "-s -w" isdr.local/hack/k8s/etcd
    # The main package's directory is named etcd, so the binary is too.
fi

if needs helm; then
    k8s_minor=$(module_version helm k8s.io/client-go | cut -d. -f2)
    ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    ld="$ld -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
    ld="$ld -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
    build helm "$ld" helm.sh/helm/v3/cmd/helm
fi

still=$(missing_list)
if [ -n "$still" ]; then
    echo "ensure-binaries: still missing after the build: ${still//$'\n'/ }" >&2
    exit 1
fi
echo "$ASSETS"
