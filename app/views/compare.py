"""Compare page: runs on a tokens axis and the relative gap per branch."""

from __future__ import annotations

import streamlit as st

st.title("Compare")
st.info("Branch comparison (token-aligned loss and the NVFP4-vs-BF16 gap) is not available in this build yet: "
        "use `healthwatch runs` to see branches.")
