"""Streamlit multipage app over a healthwatch store (``healthwatch app``)."""
