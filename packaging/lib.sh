# Sourced by packaging/lint and packaging/test-packages: the version and the packages' paths,
# named as packaging/build names them.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/agent/__init__.py")

# package_paths ARCH [RELEASE] [DIR]: the .deb and the .rpm, one a line.
package_paths() {
    local arch=$1 release=${2:-1} dir=${3:-$repo/dist} rpm_arch
    case "$arch" in
        amd64) rpm_arch=x86_64 ;;
        arm64) rpm_arch=aarch64 ;;
        *) echo "ARCH must be amd64 or arm64, not '$arch'" >&2; return 2 ;;
    esac
    printf '%s\n' "$dir/egress-agent_${version}_${arch}.deb" \
        "$dir/egress-agent-${version}-${release}.${rpm_arch}.rpm"
}
