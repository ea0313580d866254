//! HTTP tools declared in a config file (`PARLEY_TOOLS_FILE`).
