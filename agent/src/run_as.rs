//! `[commands] run_as`: the user commands and `exec` health checks run as.
//!
//! The user is looked up in the passwd database (by name, or by uid when the
//! setting is a number) each time a command is admitted, so a user created
//! after the agent started is found. The child process takes its uid, its
//! primary gid and its supplementary groups (`getgrouplist`) before `exec`,
//! and gets `HOME`, `USER` and `LOGNAME` from the passwd entry; its working
//! directory is that home when it is a directory, else `/`.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Most supplementary groups looked up for a user.
const MAX_GROUPS: usize = 65_536;
/// Room for one passwd entry's strings.
const PASSWD_BUFFER: usize = 16 * 1024;

/// A user to run as, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<libc::gid_t>,
    pub home: PathBuf,
}

/// Why `run_as` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("no user {0:?} on this server")]
    Unknown(String),
    #[error("cannot look up user {user:?}: {reason}")]
    Lookup { user: String, reason: String },
}

impl RunAs {
    /// Looks `spec` (a user name or a numeric uid) up.
    pub fn lookup(spec: &str) -> Result<Self, RunAsError> {
        let lookup_error = |reason: String| RunAsError::Lookup {
            user: spec.to_string(),
            reason,
        };
        let mut buf = vec![0 as libc::c_char; PASSWD_BUFFER];
        // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = match spec.parse::<libc::uid_t>() {
            // SAFETY: every pointer is valid for the call, buf.len() is its size.
            Ok(uid) => unsafe {
                libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result)
            },
            Err(_) => {
                let name = CString::new(spec)
                    .map_err(|_| lookup_error("the name holds a NUL byte".into()))?;
                // SAFETY: as above; `name` is NUL-terminated.
                unsafe {
                    libc::getpwnam_r(
                        name.as_ptr(),
                        &mut pwd,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut result,
                    )
                }
            }
        };
        if rc != 0 {
            return Err(lookup_error(
                std::io::Error::from_raw_os_error(rc).to_string(),
            ));
        }
        if result.is_null() || pwd.pw_name.is_null() {
            return Err(RunAsError::Unknown(spec.to_string()));
        }
        // SAFETY: getpwnam_r/getpwuid_r succeeded: the strings are
        // NUL-terminated and live in `buf`, which outlives these borrows.
        let (name, home) = unsafe {
            let name = CStr::from_ptr(pwd.pw_name).to_owned();
            let home = if pwd.pw_dir.is_null() {
                PathBuf::from("/")
            } else {
                PathBuf::from(OsStr::from_bytes(CStr::from_ptr(pwd.pw_dir).to_bytes()))
            };
            (name, home)
        };
        let groups = group_list(&name, pwd.pw_gid).map_err(lookup_error)?;
        Ok(Self {
            name: name.to_string_lossy().into_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
            home,
        })
    }

    /// The working directory of the child: the home when it is a directory.
    pub fn working_dir(&self) -> PathBuf {
        if self.home.is_dir() {
            self.home.clone()
        } else {
            PathBuf::from("/")
        }
    }

    /// Whether the agent already is this user (then nothing is switched).
    pub fn is_current(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == self.uid }
    }
}

/// `getgrouplist` for `name`, `gid` included.
fn group_list(name: &CStr, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, String> {
    let mut room: usize = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; room];
        let mut count = libc::c_int::try_from(room).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` holds `count` entries; `name` is NUL-terminated.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let wanted = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(wanted.min(room));
            return Ok(groups);
        }
        let next = if wanted > room { wanted } else { room * 2 };
        if next > MAX_GROUPS {
            return Err(format!("the user is in more than {MAX_GROUPS} groups"));
        }
        room = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_uid_and_unknown_users_are_errors() {
        let root = RunAs::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
        assert!(root.groups.contains(&0));
        assert_eq!(RunAs::lookup("0").unwrap().name, "root");
        assert_eq!(
            RunAs::lookup("no-such-user-tether").unwrap_err(),
            RunAsError::Unknown("no-such-user-tether".into())
        );
        assert!(matches!(
            RunAs::lookup("a\0b"),
            Err(RunAsError::Lookup { .. })
        ));
    }
}
