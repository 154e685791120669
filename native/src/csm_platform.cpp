// csm_platform.cpp - POSIX and Win32 versions of csm_platform.h.
#include "csm_platform.h"

#include <cerrno>
#include <cstdlib>

#ifdef _WIN32

#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>

#include <fcntl.h>
#include <io.h>
#include <malloc.h>
#include <sys/stat.h>
#include <sys/types.h>

// UTF-8 to UTF-16 for the wide CRT and Win32 calls (the narrow ones read the ANSI code page);
// an invalid UTF-8 path gives an empty string (and EINVAL).
static std::wstring wide(const char * path) {
    const int n = MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, nullptr, 0);
    if (n <= 0) {
        errno = EINVAL;
        return std::wstring();
    }
    std::wstring w((size_t) n, L'\0');
    MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, path, -1, &w[0], n);
    w.resize((size_t) n - 1);
    return w;
}

// Win32 calls report GetLastError(); callers read errno, so the common causes are mapped to it.
static void set_errno_from_win32() {
    switch (GetLastError()) {
        case ERROR_FILE_NOT_FOUND: case ERROR_PATH_NOT_FOUND: errno = ENOENT; break;
        case ERROR_ACCESS_DENIED: case ERROR_SHARING_VIOLATION: errno = EACCES; break;
        case ERROR_NOT_ENOUGH_MEMORY: case ERROR_OUTOFMEMORY: case ERROR_COMMITMENT_LIMIT: errno = ENOMEM; break;
        case ERROR_INVALID_HANDLE: errno = EBADF; break;
        default: errno = EIO; break;
    }
}

int csm_os_is_regular_path(const char * path) {
    const std::wstring w = wide(path);
    struct _stat64 st;
    if (w.empty() || _wstat64(w.c_str(), &st) != 0) return -1;
    return (st.st_mode & _S_IFMT) == _S_IFREG ? 1 : 0;
}

int csm_os_open_read(const char * path) {
    const std::wstring w = wide(path);
    if (w.empty()) return -1;
    return _wopen(w.c_str(), _O_RDONLY | _O_BINARY);
}

void csm_os_close(int fd) { _close(fd); }

std::string csm_os_fd_path(int, const char * path) { return path; }

int64_t csm_os_regular_file_size(int fd) {
    struct _stat64 st;
    if (_fstat64(fd, &st) != 0) return -1;
    if ((st.st_mode & _S_IFMT) != _S_IFREG) {
        errno = EINVAL;
        return -1;
    }
    return (int64_t) st.st_size;
}

int64_t csm_os_pread(int fd, void * buf, size_t n, uint64_t offset) {
    HANDLE h = (HANDLE) _get_osfhandle(fd);
    if (h == INVALID_HANDLE_VALUE) {
        errno = EBADF;
        return -1;
    }
    // One ReadFile takes a 32-bit count; callers loop over short reads anyway.
    const DWORD want = (DWORD) (n < (1u << 30) ? n : (1u << 30));
    OVERLAPPED ov = {};
    ov.Offset = (DWORD) (offset & 0xffffffffu);
    ov.OffsetHigh = (DWORD) (offset >> 32);
    DWORD got = 0;
    if (!ReadFile(h, buf, want, &got, &ov)) {
        if (GetLastError() == ERROR_HANDLE_EOF) return 0;
        set_errno_from_win32();
        return -1;
    }
    return (int64_t) got;
}

void * csm_os_map_read(int fd, size_t size) {
    HANDLE h = (HANDLE) _get_osfhandle(fd);
    if (h == INVALID_HANDLE_VALUE) {
        errno = EBADF;
        return nullptr;
    }
    HANDLE mapping = CreateFileMappingW(h, nullptr, PAGE_READONLY, 0, 0, nullptr);
    if (!mapping) {
        set_errno_from_win32();
        return nullptr;
    }
    void * addr = MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, size);
    if (!addr) set_errno_from_win32();
    CloseHandle(mapping); // the view keeps the mapping object alive until it is unmapped
    return addr;
}

void csm_os_unmap(void * addr, size_t) { UnmapViewOfFile(addr); }

size_t csm_os_page_size() {
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwPageSize;
}

// VirtualUnlock on pages that are not locked removes them from the working set (documented
// behaviour): the Windows counterpart of madvise(MADV_DONTNEED) on a read-only file view. It
// "fails" with ERROR_NOT_LOCKED while doing so, which is expected.
void csm_os_drop_pages(void * addr, size_t size) { VirtualUnlock(addr, size); }

void * csm_os_aligned_alloc(size_t align, size_t size) {
    void * p = _aligned_malloc(size, align);
    if (!p) errno = ENOMEM;
    return p;
}

void csm_os_aligned_free(void * p) { _aligned_free(p); }

void csm_os_advise_huge_pages(void *, size_t) {} // large pages need a privilege users do not have

uint64_t csm_os_physical_memory() {
    MEMORYSTATUSEX ms;
    ms.dwLength = sizeof(ms);
    return GlobalMemoryStatusEx(&ms) ? (uint64_t) ms.ullTotalPhys : 0;
}

int64_t csm_os_process_cpu_ns() {
    FILETIME create, exit, kernel, user; // 100 ns units
    if (!GetProcessTimes(GetCurrentProcess(), &create, &exit, &kernel, &user)) return -1;
    const auto ticks = [](const FILETIME & f) { return ((int64_t) f.dwHighDateTime << 32) | f.dwLowDateTime; };
    return (ticks(kernel) + ticks(user)) * 100;
}

int64_t csm_os_process_run_delay_ns() { return -1; }

FILE * csm_os_fopen_read(const char * path) {
    const std::wstring w = wide(path);
    return w.empty() ? nullptr : _wfopen(w.c_str(), L"rb");
}

FILE * csm_os_create_temp(std::string & path) {
    const size_t n = path.size();
    if (n < 6 || path.compare(n - 6, 6, "XXXXXX") != 0) {
        errno = EINVAL;
        return nullptr;
    }
    static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    uint64_t x = GetTickCount64() ^ ((uint64_t) GetCurrentProcessId() << 32) ^ (uint64_t) (uintptr_t) &path;
    for (int attempt = 0; attempt < 100; attempt++) {
        for (size_t i = n - 6; i < n; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            path[i] = digits[(x >> 33) % 36];
        }
        const std::wstring w = wide(path.c_str());
        if (w.empty()) return nullptr;
        const int fd = _wopen(w.c_str(), _O_CREAT | _O_EXCL | _O_WRONLY | _O_BINARY, _S_IREAD | _S_IWRITE);
        if (fd < 0) {
            if (errno == EEXIST) continue;
            return nullptr;
        }
        FILE * f = _fdopen(fd, "wb");
        if (!f) {
            _close(fd);
            _wremove(w.c_str());
        }
        return f;
    }
    errno = EEXIST;
    return nullptr;
}

int64_t csm_os_fsize(FILE * f) {
    if (_fseeki64(f, 0, SEEK_END) != 0) return -1;
    return (int64_t) _ftelli64(f);
}

int csm_os_fseek(FILE * f, uint64_t offset) { return _fseeki64(f, (__int64) offset, SEEK_SET); }

int csm_os_replace(const char * from, const char * to) {
    const std::wstring a = wide(from), b = wide(to);
    if (a.empty() || b.empty()) return -1;
    if (MoveFileExW(a.c_str(), b.c_str(), MOVEFILE_REPLACE_EXISTING)) return 0;
    set_errno_from_win32();
    return -1;
}

int csm_os_remove(const char * path) {
    const std::wstring w = wide(path);
    return w.empty() ? -1 : _wremove(w.c_str());
}

#else // POSIX

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>
#include <dirent.h>
#include <cstdio>

int csm_os_is_regular_path(const char * path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return S_ISREG(st.st_mode) ? 1 : 0;
}

int csm_os_open_read(const char * path) { return open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); }

void csm_os_close(int fd) { close(fd); }

std::string csm_os_fd_path(int fd, const char * path) {
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    return access(proc.c_str(), R_OK) == 0 ? proc : path;
}

int64_t csm_os_regular_file_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    if (!S_ISREG(st.st_mode)) {
        errno = EINVAL;
        return -1;
    }
    return (int64_t) st.st_size;
}

int64_t csm_os_pread(int fd, void * buf, size_t n, uint64_t offset) {
    return (int64_t) pread(fd, buf, n, (off_t) offset);
}

void * csm_os_map_read(int fd, size_t size) {
    void * addr = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    return addr == MAP_FAILED ? nullptr : addr;
}

void csm_os_unmap(void * addr, size_t size) { munmap(addr, size); }

size_t csm_os_page_size() { return (size_t) sysconf(_SC_PAGESIZE); }

void csm_os_drop_pages(void * addr, size_t size) { madvise(addr, size, MADV_DONTNEED); }

void * csm_os_aligned_alloc(size_t align, size_t size) {
    void * p = nullptr;
    if (posix_memalign(&p, align, size) != 0) {
        errno = ENOMEM;
        return nullptr;
    }
    return p;
}

void csm_os_aligned_free(void * p) { free(p); }

void csm_os_advise_huge_pages(void * addr, size_t size) {
#ifdef MADV_HUGEPAGE
    madvise(addr, size, MADV_HUGEPAGE);
#else
    (void) addr;
    (void) size;
#endif
}

uint64_t csm_os_physical_memory() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (uint64_t) pages * (uint64_t) page : 0;
}

int64_t csm_os_process_cpu_ns() {
    timespec ts;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return -1;
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t csm_os_process_run_delay_ns() {
#ifdef __linux__
    DIR * d = opendir("/proc/self/task");
    if (!d) return -1;
    int64_t total = 0;
    bool any = false;
    while (const dirent * e = readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%.20s/schedstat", e->d_name);
        const int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue; // the thread just ended
        char buf[96];
        const ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        unsigned long long run = 0, wait = 0; // "run_ns wait_ns timeslices"
        if (sscanf(buf, "%llu %llu", &run, &wait) == 2) {
            total += (int64_t) wait;
            any = true;
        }
    }
    closedir(d);
    return any ? total : -1;
#else
    return -1;
#endif
}

FILE * csm_os_fopen_read(const char * path) { return fopen(path, "rb"); }

FILE * csm_os_create_temp(std::string & path) {
    const int fd = mkstemp(&path[0]);
    if (fd < 0) return nullptr;
    fchmod(fd, 0644); // mkstemp's 0600 would otherwise become the output file's mode
    FILE * f = fdopen(fd, "wb");
    if (!f) {
        const int e = errno;
        close(fd);
        remove(path.c_str());
        errno = e;
    }
    return f;
}

int64_t csm_os_fsize(FILE * f) {
    if (fseeko(f, 0, SEEK_END) != 0) return -1;
    return (int64_t) ftello(f);
}

int csm_os_fseek(FILE * f, uint64_t offset) { return fseeko(f, (off_t) offset, SEEK_SET); }

int csm_os_replace(const char * from, const char * to) { return rename(from, to); }

int csm_os_remove(const char * path) { return remove(path); }

#endif
