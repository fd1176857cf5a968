#!/usr/bin/env bash
# What a task's git costs the executor on a repository of a given size:
# generates it (30,000 files, ~435 MB work tree, 20 commits by default)
# as a remote reached through git's transport, then times a task's
# workspace preparation and landing with a clone per attempt, a cold and
# a warm git cache, and the by-hand reference (warm mirror + git worktree).
#
#   bash bench/git.sh [--files N] [--file-bytes B] [--commits C] [--rounds R] [--dir D]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p omoi-bench --bin omoi-git-bench
exec target/release/omoi-git-bench "$@"
