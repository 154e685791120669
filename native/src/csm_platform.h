// csm_platform.h - the operating-system calls of the loader and the packed-matrix allocator, in one
// place: POSIX on Linux and macOS, Win32 on Windows (csm_platform.cpp). Everything else in native/
// is portable C++ on ggml.
//
// A file is a C runtime descriptor (an int, as POSIX open() gives and Windows' _wopen() gives too).
// Failures return -1 or nullptr with errno set, so callers report strerror(errno) on every system.
#pragma once

#include <cstddef>
#include <cstdint>

// Opens a file for reading. The path is UTF-8 (what Python's os.fsencode gives on every system).
int csm_os_open_read(const char * path);
void csm_os_close(int fd);

// Size in bytes of an open regular file; -1 when it is not a regular file or cannot be examined.
int64_t csm_os_regular_file_size(int fd);

// Reads up to n bytes at offset without moving a shared file position: bytes read, 0 at the end of
// the file, -1 on error. Offsets are 64-bit on every system (the f16 model is 3.4 GiB).
int64_t csm_os_pread(int fd, void * buf, size_t n, uint64_t offset);

// The first `size` bytes of the file as read-only shared memory; nullptr on failure.
void * csm_os_map_read(int fd, size_t size);
void csm_os_unmap(void * addr, size_t size);

// Page size of the mappings above, and a hint that whole pages of a mapping will not be read again
// (their copies live elsewhere), so the system may drop them from this process's resident memory.
size_t csm_os_page_size();
void csm_os_drop_pages(void * addr, size_t size);

// Memory aligned to `align` (a power of two, a multiple of the pointer size); free it with
// csm_os_aligned_free. csm_os_advise_huge_pages asks for transparent huge pages where there are any.
void * csm_os_aligned_alloc(size_t align, size_t size);
void csm_os_aligned_free(void * p);
void csm_os_advise_huge_pages(void * addr, size_t size);
