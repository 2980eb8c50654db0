"""repd's terminal dashboard (``repd-tui``); the app lives in :mod:`repd_tui.app`."""
