"""Who started a run: the logged-in Streamlit user, a name given once per browser session, or the OS user.

The library only records the name it is given; pages decide where it comes from (`st.user` when login
is configured, else a text box) and pass it through `resolve_user`. The CLI uses the OS user. The
functions live in zimage.users (below zimage.auth, which needs them too); this module keeps the names
the jobs package has always offered.
"""

from zimage.users import BadUserName, check_user_name, os_user, resolve_user

__all__ = ["BadUserName", "check_user_name", "os_user", "resolve_user"]
