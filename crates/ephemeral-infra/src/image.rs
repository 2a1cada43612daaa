//! Images without Docker: the binaries a contents file lists (the service's
//! is `image/contents`), their shared libraries (as `ldd` finds them on this
//! machine), the CA bundle and a `nonroot` user, packed as an OCI image
//! layout tarball that `ctr images import` takes. The Dockerfile builds the
//! service's list on distroless for users with Docker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// What `image/contents` says the image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// (built file, path in the image).
    pub binaries: Vec<(PathBuf, String)>,
    /// (path in the image, what the symlink points to), e.g. busybox applets.
    pub links: Vec<(String, String)>,
    /// `uid:gid`.
    pub user: String,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The default command.
    pub cmd: Vec<String>,
    /// Ports.
    pub expose: Vec<u16>,
}

impl Contents {
    /// Parses `image/contents`; built files are relative to `root`.
    pub fn parse(text: &str, root: &Path) -> Result<Self> {
        let bad = |line: &str| Error::Prepare {
            step: "reading image/contents".into(),
            detail: format!("cannot read {line:?}"),
        };
        let mut c = Contents {
            binaries: Vec::new(),
            links: Vec::new(),
            user: String::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            expose: Vec::new(),
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let rest: Vec<String> = words.map(str::to_owned).collect();
            match (kind, rest.as_slice()) {
                ("binary", [src, dest]) => c.binaries.push((root.join(src), dest.clone())),
                ("link", [target, path]) => c.links.push((path.clone(), target.clone())),
                ("user", [user]) => c.user = user.clone(),
                ("entrypoint", args) => c.entrypoint = args.to_vec(),
                ("cmd", args) => c.cmd = args.to_vec(),
                ("expose", ports) => {
                    c.expose = ports
                        .iter()
                        .map(|p| p.parse().map_err(|_| bad(line)))
                        .collect::<Result<_>>()?
                }
                _ => return Err(bad(line)),
            }
        }
        Ok(c)
    }
}

/// A packed image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The tarball.
    pub path: PathBuf,
    /// The manifest's digest, `sha256:…`.
    pub digest: String,
    /// Every file in its layer, by path in the image.
    pub files: Vec<String>,
}

/// The shared libraries `binary` loads, by `ldd`, with the loader; none for
/// a static binary (Go's, or pause built with `gcc -static`).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    let said = |s: &[u8]| String::from_utf8_lossy(s).contains("not a dynamic executable");
    if said(&out.stdout) || said(&out.stderr) {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(Error::Prepare {
            step: format!("ldd {}", binary.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`; vdso has no file.
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Packs `contents` as an OCI image layout tarball at `out`, named `name`
/// (e.g. `orders-center:dev`). Everything is owned by root with time 0, so
/// the same inputs give the same digest.
pub fn pack(contents: &Contents, name: &str, out: &Path) -> Result<Image> {
    // Path in the image -> (file on this machine, mode).
    let mut files: BTreeMap<String, (PathBuf, u32)> = BTreeMap::new();
    for (src, dest) in &contents.binaries {
        if !src.is_file() {
            return Err(Error::Prepare {
                step: "packing the image".into(),
                detail: format!("{} is not built", src.display()),
            });
        }
        files.insert(dest.clone(), (src.clone(), 0o755));
        for lib in libraries(src)? {
            files.insert(lib.to_string_lossy().into_owned(), (lib, 0o755));
        }
    }
    let bundle = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    files.insert(bundle.to_string_lossy().into_owned(), (bundle, 0o644));
    let (uid, gid) = contents
        .user
        .split_once(':')
        .unwrap_or((&contents.user, "0"));

    let mut layer = tar::Builder::new(Vec::new());
    let mut entry = |path: &str, data: &[u8], mode: u32| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        layer.append_data(&mut header, path.trim_start_matches('/'), data)?;
        Ok(())
    };
    entry(
        "/etc/passwd",
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{uid}:{gid}:nonroot:/home/nonroot:/sbin/nologin\n").as_bytes(),
        0o644,
    )?;
    entry(
        "/etc/group",
        format!("root:x:0:\nnonroot:x:{gid}:\n").as_bytes(),
        0o644,
    )?;
    for (dest, (src, mode)) in &files {
        // Libraries are often symlinks: the image gets the file itself.
        entry(dest, &std::fs::read(src)?, *mode)?;
    }
    for (path, target) in &contents.links {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Symlink);
        layer.append_link(&mut header, path.trim_start_matches('/'), target)?;
    }
    let tar = layer.into_inner()?;
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let gz = gz.finish()?;

    let ports: serde_json::Map<String, serde_json::Value> = contents
        .expose
        .iter()
        .map(|p| (format!("{p}/tcp"), json!({})))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": contents.user,
            "Entrypoint": contents.entrypoint,
            "Cmd": contents.cmd,
            "ExposedPorts": ports,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin",
                    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(&gz), "size": gz.len()}],
    }))?;
    let digest = sha256(&manifest);
    let (repo, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
    let full = if repo.contains('/') {
        format!("{repo}:{tag}")
    } else {
        format!("docker.io/library/{repo}:{tag}")
    };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": manifest.len(),
            "annotations": {"io.containerd.image.name": full,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }))?;

    let mut layout = tar::Builder::new(std::fs::File::create(out)?);
    let mut put = |path: &str, data: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        layout.append_data(&mut header, path, data)?;
        Ok(())
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &index)?;
    for blob in [&config, &manifest, &gz] {
        let hex = sha256(blob).trim_start_matches("sha256:").to_owned();
        put(&format!("blobs/sha256/{hex}"), blob)?;
    }
    layout.finish()?;
    Ok(Image {
        path: out.to_owned(),
        digest,
        files: ["/etc/passwd".to_owned(), "/etc/group".to_owned()]
            .into_iter()
            .chain(files.into_keys())
            .chain(contents.links.iter().map(|(path, _)| path.clone()))
            .collect(),
    })
}
