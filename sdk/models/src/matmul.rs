//! Matrix products on strided views of CPU buffers, for the fused ops
//! (`linear`, `attention`). The gemm crate is what candle's own CPU matmul
//! calls; calling it on views lets an op read a head's queries straight out
//! of the packed projections, or write a gradient into its slice of a wider
//! buffer, without the copies that candle's reshapes and transposes make.

use candle_core::WithDType;

/// A matrix read from `data`: element `(i, j)` is
/// `data[offset + i * row_stride + j * col_stride]`.
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    offset: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// `data` as the row-major matrix it is, `cols` wide.
    pub(crate) fn rows(data: &'a [T], cols: usize) -> Self {
        Self::strided(data, 0, cols, 1)
    }

    /// The transpose of the row-major matrix `data`, `cols` wide.
    pub(crate) fn transposed(data: &'a [T], cols: usize) -> Self {
        Self::strided(data, 0, 1, cols)
    }

    /// Element `(i, j)` at `offset + i * row_stride + j * col_stride`.
    pub(crate) fn strided(
        data: &'a [T],
        offset: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        Self {
            data,
            offset,
            row_stride,
            col_stride,
        }
    }

    /// Whether every element of a `rows` x `cols` matrix lies in `data`.
    fn spans(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// A matrix written into `data`: element `(i, j)` at
/// `offset + i * row_stride + j * col_stride`.
pub(crate) struct MatMut<'a, T> {
    data: &'a mut [T],
    offset: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// `data` as the row-major matrix it is, `cols` wide.
    pub(crate) fn rows(data: &'a mut [T], cols: usize) -> Self {
        Self::strided(data, 0, cols)
    }

    /// Row `i` starts at `offset + i * row_stride`; columns are adjacent.
    pub(crate) fn strided(data: &'a mut [T], offset: usize, row_stride: usize) -> Self {
        Self {
            data,
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    /// `data` as a column-major matrix of `rows` rows.
    pub(crate) fn columns(data: &'a mut [T], rows: usize) -> Self {
        Self {
            data,
            offset: 0,
            row_stride: 1,
            col_stride: rows,
        }
    }
}

/// Whether a product runs on candle's thread count (gemm's rayon pool) or
/// on the calling thread alone (the caller runs several at once).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Threads {
    Candle,
    One,
}

/// Products of fewer multiply-adds than this run on one thread: handing a
/// decoding step's products (16 rows, about a million) to the pool cost more
/// than it saved (batch-16 generation ran 1.6x faster on one thread than on
/// two). A training step's smallest is 33 million.
const PARALLEL_MIN: usize = 1 << 22;

/// `dst [m, n] = a [m, inner] b [inner, n]`, or `+=` when `accumulate`.
///
/// # Panics
/// If a matrix reaches outside its buffer (a caller's bug).
pub(crate) fn gemm<T: WithDType>(
    (m, n, inner): (usize, usize, usize),
    dst: MatMut<T>,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    threads: Threads,
) {
    let dst_fits = m == 0
        || n == 0
        || dst.offset + (m - 1) * dst.row_stride + (n - 1) * dst.col_stride < dst.data.len();
    assert!(
        dst_fits && a.spans(m, inner) && b.spans(inner, n),
        "gemm operands outside their buffers"
    );
    // Distinct elements of dst must not share a place (gemm's threads write
    // them concurrently): whole rows or whole columns apart.
    let (rs, cs) = (dst.row_stride, dst.col_stride);
    assert!(
        m <= 1 || n <= 1 || rs >= n * cs || cs >= m * rs,
        "gemm destination overlaps itself"
    );
    if m == 0 || n == 0 {
        return;
    }
    if inner == 0 {
        // gemm does not touch dst for an empty inner dimension.
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[dst.offset + i * dst.row_stride + j * dst.col_stride] = T::zero();
                }
            }
        }
        return;
    }
    let count = candle_core::utils::get_num_threads();
    let parallelism = match threads {
        Threads::Candle if count > 1 && m * n * inner >= PARALLEL_MIN => {
            gemm::Parallelism::Rayon(count)
        }
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the assert bounds every element the strides reach, in dst, a
    // and b; T is f32 or f64 (the callers dispatch on CpuStorage), which
    // gemm supports; dst is borrowed mutably, a and b shared, so they do not
    // overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            inner,
            dst.data.as_mut_ptr().add(dst.offset),
            dst.col_stride as isize,
            dst.row_stride as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.col_stride as isize,
            b.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, inner: usize, a: &Mat<f64>, b: &Mat<f64>) -> Vec<f64> {
        let at = |x: &Mat<f64>, i: usize, j: usize| {
            x.data[x.offset + i * x.row_stride + j * x.col_stride]
        };
        (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| (0..inner).map(|p| at(a, i, p) * at(b, p, j)).sum())
            .collect()
    }

    #[test]
    fn strided_views_multiply_like_the_naive_product() {
        let data: Vec<f64> = (0..200).map(|i| ((i * 37) % 19) as f64 - 9.0).collect();
        for threads in [Threads::Candle, Threads::One] {
            // a: 3x4 at offset 5, rows 10 apart; b: the transpose of a 5x4
            // row-major block at offset 60.
            let (a, b) = (Mat::strided(&data, 5, 10, 1), Mat::strided(&data, 60, 1, 4));
            let expected = naive(3, 5, 4, &a, &b);
            // Written into the middle columns of a 3x9 buffer.
            let mut out = vec![7.0; 27];
            gemm(
                (3, 5, 4),
                MatMut::strided(&mut out, 2, 9),
                false,
                a,
                b,
                threads,
            );
            for i in 0..3 {
                assert_eq!(&out[i * 9 + 2..i * 9 + 7], &expected[i * 5..i * 5 + 5]);
                assert_eq!(out[i * 9], 7.0, "outside the view untouched");
            }
            let (a, b) = (Mat::strided(&data, 5, 10, 1), Mat::strided(&data, 60, 1, 4));
            gemm(
                (3, 5, 4),
                MatMut::strided(&mut out, 2, 9),
                true,
                a,
                b,
                threads,
            );
            assert_eq!(out[2], 2.0 * expected[0], "accumulates");
        }
    }

    #[test]
    #[should_panic(expected = "outside their buffers")]
    fn a_view_past_its_buffer_panics() {
        let data = vec![1.0f32; 10];
        let mut out = vec![0.0f32; 4];
        gemm(
            (2, 2, 3),
            MatMut::rows(&mut out, 2),
            false,
            Mat::rows(&data, 3),
            Mat::strided(&data, 6, 2, 1),
            Threads::One,
        );
    }
}
