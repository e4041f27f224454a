//! Client of a server's admin socket (`<data_dir>/admin.sock`): one
//! command line per connection, text lines back; errors start with
//! `error:`. Lives here so every admin tool shares it without linking the
//! server.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a server with data directory `data_dir` listens for admin commands.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Sends `command` and returns the answer.
pub fn request(data_dir: &Path, command: &str) -> std::io::Result<String> {
    let path = socket_path(data_dir);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot reach the server at {}: {e} (is it running?)", path.display()))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(command.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
