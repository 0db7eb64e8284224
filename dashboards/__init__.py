"""Streamlit review and audit dashboards: read the audit store and the bundle; no triage logic here."""
