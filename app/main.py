"""healthwatch app: ``healthwatch app --store S`` (or ``streamlit run app/main.py -- --store S``).

The pages live in ``views/`` rather than ``pages/``: with ``st.navigation`` the folder name does
not matter to Streamlit, and ``views`` is the subpackage the distribution ships
(``healthwatch.app.views``).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from healthwatch.app.data import store_path

HERE = Path(__file__).parent

st.set_page_config(page_title="healthwatch", page_icon=":material/monitor_heart:", layout="wide")

PAGES = [
    st.Page(HERE / "views" / "runs.py", title="Runs", icon=":material/account_tree:", default=True),
    st.Page(HERE / "views" / "run.py", title="Run", icon=":material/monitoring:"),
    st.Page(HERE / "views" / "divergence.py", title="Divergence", icon=":material/trending_up:"),
    st.Page(HERE / "views" / "compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page(HERE / "views" / "alerts.py", title="Alerts", icon=":material/notifications:"),
]
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"Store: `{store_path()}`")
page.run()
