#!/usr/bin/env bash
# Print the Debian packages of the system programs the tests use as real peers that this machine lacks,
# one per line: dcmtk (DICOM network peer), chromium and chromium-driver (dashboard e2e, each checked on
# its own), postgresql (audit store server, started by the tests on loopback), orthanc and orthanc-dicomweb
# (the PACS that receives our result objects, and its DICOMweb plugin, each checked on its own),
# dicom3tools (dciodvfy validates every object we emit).
# POSTGRES_GLOB overrides where initdb is looked for, ORTHANC_DICOMWEB_PLUGIN the plugin file (tests).
command -v storescp >/dev/null || echo dcmtk
command -v chromium >/dev/null || echo chromium
command -v chromedriver >/dev/null || echo chromium-driver
compgen -G "${POSTGRES_GLOB:-/usr/lib/postgresql/*/bin/initdb}" >/dev/null || echo postgresql
command -v Orthanc >/dev/null || echo orthanc
[ -f "${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}" ] || echo orthanc-dicomweb
command -v dciodvfy >/dev/null || echo dicom3tools
exit 0
