#!/usr/bin/env bash
# Rebuilds the kernel relay's XDP program (crates/turn/bpf/relay.bpf.o)
# from its source, and records the source's hash beside it; a unit test
# checks that the committed object was built from the committed source.
# Needs: apt-get install -y clang libbpf-dev. The default CPU (v1) has
# the 64-bit compare-and-swap the bandwidth budgets use; -mcpu=v3, tried
# for it, made the verifier walk past its limit.
set -euo pipefail
cd "$(dirname "$0")/../crates/turn/bpf"
clang -O2 -g -Wall -Werror -target bpf -I/usr/include/"$(uname -m)"-linux-gnu \
    -c relay.bpf.c -o relay.bpf.o
# Debug info names the build directory; keep the object the same wherever
# it is built.
llvm-strip --strip-debug --keep-section=.BTF --keep-section=.BTF.ext relay.bpf.o 2>/dev/null || true
sha256sum relay.bpf.c | cut -d' ' -f1 > relay.bpf.c.sha256
echo "built $(pwd)/relay.bpf.o"
