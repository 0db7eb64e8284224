#!/usr/bin/env bash
# Print the Debian packages of the system programs the tests use as real peers that this machine lacks,
# one per line: dcmtk (DICOM network peer), chromium and chromium-driver (dashboard e2e, each checked on
# its own), postgresql (audit store server, started by the tests on loopback).
# POSTGRES_GLOB overrides where initdb is looked for (tests).
command -v storescp >/dev/null || echo dcmtk
command -v chromium >/dev/null || echo chromium
command -v chromedriver >/dev/null || echo chromium-driver
compgen -G "${POSTGRES_GLOB:-/usr/lib/postgresql/*/bin/initdb}" >/dev/null || echo postgresql
exit 0
