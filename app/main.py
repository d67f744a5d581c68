"""healthwatch app: ``streamlit run app/main.py -- --store S`` (or ``healthwatch app``)."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="healthwatch", layout="wide")

PAGES = [
    st.Page("pages/runs.py", title="Runs", icon="🗂️", default=True),
    st.Page("pages/run.py", title="Run", icon="📈"),
    st.Page("pages/compare.py", title="Compare", icon="⚖️"),
    st.Page("pages/alerts.py", title="Alerts", icon="🚨"),
]
st.navigation(PAGES).run()
