//! Aligned columns with an upper-case header, as `kubectl get` prints them.

/// Renders `rows` under `header`, each column as wide as its widest cell, three spaces
/// apart; no trailing spaces.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align() {
        let out = super::render(
            &["NODE", "STATE"],
            &[
                vec!["aws-1".into(), "up".into()],
                vec!["a".into(), "never".into()],
            ],
        );
        assert_eq!(out, "NODE    STATE\naws-1   up\na       never\n");
    }
}
