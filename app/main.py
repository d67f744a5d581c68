"""healthwatch app: ``streamlit run app/main.py -- --store S`` (or ``healthwatch app``)."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="healthwatch", layout="wide")

PAGES = [
    st.Page("views/runs.py", title="Runs", default=True),
    st.Page("views/run.py", title="Run"),
    st.Page("views/compare.py", title="Compare"),
    st.Page("views/alerts.py", title="Alerts"),
]
st.navigation(PAGES).run()
