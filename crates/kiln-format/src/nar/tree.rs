//! An in-memory file system tree: build NARs in tests, parse small NARs for inspection.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::parse::{parse, Limits, NarSink};
use super::write::NarWriter;
use crate::Error;

/// A file system object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(BTreeMap<Vec<u8>, Node>),
}

impl Node {
    /// A non-executable file.
    pub fn file(contents: impl Into<Vec<u8>>) -> Node {
        Node::File {
            executable: false,
            contents: contents.into(),
        }
    }

    /// The NAR serialisation.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut w = NarWriter::new(Vec::new()).expect("writing to a Vec cannot fail");
        self.write(&mut w).expect("writing to a Vec cannot fail");
        w.into_inner()
    }

    /// Writes this node (recursively; trees built in memory are shallow).
    pub fn write<W: Write>(&self, w: &mut NarWriter<W>) -> std::io::Result<()> {
        match self {
            Node::File {
                executable,
                contents,
            } => w.file(*executable, contents),
            Node::Symlink { target } => w.symlink(target),
            Node::Directory(entries) => {
                w.directory_start()?;
                for (name, node) in entries {
                    w.entry_start(name)?;
                    node.write(w)?;
                    w.entry_end()?;
                }
                w.directory_end()
            }
        }
    }

    /// Parses a NAR into a tree.
    pub fn from_nar(r: impl Read) -> Result<Node, Error> {
        let mut b = TreeBuilder {
            stack: Vec::new(),
            root: None,
        };
        parse(r, &mut b, Limits::default())?;
        b.root.ok_or_else(|| Error::Nar {
            offset: 0,
            message: "empty archive".into(),
        })
    }
}

/// An open directory: its entry name (none for the root) and the entries read so far.
type OpenDir = (Option<Vec<u8>>, BTreeMap<Vec<u8>, Node>);

struct TreeBuilder {
    stack: Vec<OpenDir>,
    root: Option<Node>,
}

impl TreeBuilder {
    fn put(&mut self, name: Option<&[u8]>, node: Node) {
        match (name, self.stack.last_mut()) {
            (Some(n), Some((_, entries))) => {
                entries.insert(n.to_vec(), node);
            }
            _ => self.root = Some(node),
        }
    }
}

impl NarSink for TreeBuilder {
    fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), Error> {
        // Trees are for small archives; cap the up-front reservation regardless of `size`.
        let mut v = Vec::with_capacity(size.min(1 << 20) as usize);
        contents.read_to_end(&mut v).map_err(|e| Error::Nar {
            offset: u64::MAX,
            message: e.to_string(),
        })?;
        self.put(
            name,
            Node::File {
                executable,
                contents: v,
            },
        );
        Ok(())
    }
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), Error> {
        self.put(
            name,
            Node::Symlink {
                target: target.to_vec(),
            },
        );
        Ok(())
    }
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), Error> {
        self.stack.push((name.map(<[u8]>::to_vec), BTreeMap::new()));
        Ok(())
    }
    fn leave_directory(&mut self) -> Result<(), Error> {
        if let Some((name, entries)) = self.stack.pop() {
            self.put(name.as_deref(), Node::Directory(entries));
        }
        Ok(())
    }
}
